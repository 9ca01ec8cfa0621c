"""Sources: checkpoint folders read one tensor at a time, in the format's own names (`raw`) or
in our parameter names (`ours`). The ZeRO-3 source is in zero.py; open one with
load.open_source.

    consolidated  model.safetensors (or model-0000i-of-0000n.safetensors + index.json) in OUR
                  parameter names, config.yaml (the TrainConfig), layout.json
    hf            config.json, model*.safetensors in Hugging Face Llama/Mistral names,
                  generation_config.json, tokenizer files, loretta_config.yaml,
                  loretta_layout.json (a foreign HF folder has neither: pass a layout file)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from loretta.checkpoint.hf import (
    ARCH_FIELDS_ALL,
    arch_diffs,
    config_from_hf,
    hf_shapes,
    model_config_from_yaml,
    param_shapes,
)
from loretta.checkpoint.io import (
    SafetensorsFolder,
    TensorInfo,
    read_json,
    read_layout_file,
    read_yaml,
)
from loretta.configlib import to_dict
from loretta.errors import CheckpointError
from loretta.model import hf as hf_map
from loretta.model.config import DecoderConfig
from loretta.vocab import VocabLayout

HF_LAYOUT_FILE = "loretta_layout.json"


class Source:
    """Weights in one of the three formats, read one tensor at a time.

    `raw` tensors are the format's own names (HF names for an HF folder); `ours` are our
    parameter names (HF q/k/v and gate/up fused back)."""

    kind = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model_cfg = DecoderConfig()
        self.layout: VocabLayout | None = None
        self.layout_file: Path | None = None
        self.config_file: Path | None = None
        self.train_config: dict[str, Any] = {}  # the TrainConfig YAML as a dict ({} if none)
        self.info: dict[str, Any] = {}  # step, world size, ...

    def raw_infos(self) -> list[TensorInfo]:
        return self.our_infos()

    def read_raw(self, name: str) -> torch.Tensor:
        return self.read_ours(name)

    def iter_raw(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.iter_ours()

    def our_infos(self) -> list[TensorInfo]:
        raise NotImplementedError

    def read_ours(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def iter_ours(self) -> Iterator[tuple[str, torch.Tensor]]:
        for info in self.our_infos():
            yield info.name, self.read_ours(info.name)

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def check_names(self, found: dict[str, tuple[int, ...]], where: Path) -> None:
        want = param_shapes(self.model_cfg)
        problems = [f"missing {n} {s}" for n, s in want.items() if n not in found]
        problems += [f"unexpected {n}" for n in found if n not in want]
        problems += [
            f"{n}: shape {found[n]} but the model config needs {s}"
            for n, s in want.items()
            if n in found and tuple(found[n]) != s
        ]
        if problems:
            raise CheckpointError(
                f"{where}: tensors do not match the model config in {self.config_file}: "
                + "; ".join(problems[:10])
                + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
            )


class ConsolidatedSource(Source):
    kind = "consolidated"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.config_file, self.layout_file = folder / "config.yaml", folder / "layout.json"
        self.train_config = read_yaml(self.config_file)
        self.model_cfg = model_config_from_yaml(self.train_config, self.config_file)
        self.layout = read_layout_file(self.layout_file)
        self.st = SafetensorsFolder(folder)
        self._infos = self.st.infos()
        self.check_names({i.name: i.shape for i in self._infos}, folder)
        order = {n: i for i, n in enumerate(param_shapes(self.model_cfg))}
        self._infos.sort(key=lambda i: order[i.name])
        self.info = dict(self.st.metadata)

    def our_infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read_ours(self, name: str) -> torch.Tensor:
        return self.st.read(name)

    def close(self) -> None:
        self.st.close()


class HFSource(Source):
    """A Hugging Face Llama/Mistral folder. Ours carries loretta_config.yaml and
    loretta_layout.json; a foreign one (written by other tools) has neither: its model config
    comes from config.json and its vocabulary layout from `layout_file`, if given."""

    kind = "hf"

    def __init__(self, folder: Path, layout_file: Path | None = None) -> None:
        super().__init__(folder)
        hf = read_json(folder / "config.json")
        cfg = config_from_hf(hf, str(folder / "config.json"))
        ours = folder / "loretta_config.yaml"
        if ours.exists():
            self.config_file = ours
            self.train_config = read_yaml(ours)
            mine = model_config_from_yaml(self.train_config, ours)
            diffs = arch_diffs(mine, cfg, ARCH_FIELDS_ALL)
            if diffs:
                raise CheckpointError(
                    f"{ours} disagrees with {folder / 'config.json'}: {'; '.join(diffs)}; "
                    "one of them was edited by hand"
                )
            cfg = mine  # keeps settings HF cannot express (attn_backend, dropout, ...)
        else:
            self.config_file = folder / "config.json"
            self.train_config = {"model": to_dict(cfg)}
        self.model_cfg = cfg
        self.foreign = not (folder / HF_LAYOUT_FILE).exists()
        self.layout_file = layout_file or folder / HF_LAYOUT_FILE
        if layout_file is not None and not layout_file.exists():
            raise CheckpointError(f"{layout_file}: no such layout file")
        self.layout = read_layout_file(self.layout_file) if self.layout_file.exists() else None
        self.st = SafetensorsFolder(folder)
        want = hf_shapes(cfg)
        found = {i.name: i for i in self.st.infos()}
        if cfg.tie_embeddings:
            found.pop("lm_head.weight", None)  # some exporters save the tied copy too
        problems = [f"missing {n} {s}" for n, s in want.items() if n not in found]
        problems += [f"unexpected {n}" for n in found if n not in want]
        problems += [
            f"{n}: shape {found[n].shape}, config.json needs {s}"
            for n, s in want.items()
            if n in found and found[n].shape != s
        ]
        if problems:
            self.st.close()
            raise CheckpointError(
                f"{folder}: tensors do not match config.json: " + "; ".join(problems[:10])
            )
        self._raw = [found[n] for n in want]
        self._groups = dict(hf_map.hf_groups(cfg))  # our name -> HF names, in row order
        self.info = dict(self.st.metadata)
        self.info["architecture"] = (hf.get("architectures") or ["?"])[0]

    def raw_infos(self) -> list[TensorInfo]:
        return list(self._raw)

    def read_raw(self, name: str) -> torch.Tensor:
        return self.st.read(name)

    def iter_raw(self) -> Iterator[tuple[str, torch.Tensor]]:
        for info in self._raw:
            yield info.name, self.st.read(info.name)

    def our_infos(self) -> list[TensorInfo]:
        dtypes = {i.name: i.dtype for i in self._raw}
        return [
            TensorInfo(n, s, dtypes[self._groups[n][0]])
            for n, s in param_shapes(self.model_cfg).items()
        ]

    def read_ours(self, name: str) -> torch.Tensor:
        parts = [self.st.read(hf) for hf in self._groups[name]]
        if len({p.dtype for p in parts}) > 1:
            raise CheckpointError(f"{self.path}: the pieces of {name} have different dtypes")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def close(self) -> None:
        self.st.close()
