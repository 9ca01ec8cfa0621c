"""The training configuration: one typed dataclass per component, validated all at once.

Every number has one home here. The DeepSpeed JSON receives batch size, learning rate, clipping
and precision from this config (see loretta/engine.py); a conflicting value there is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loretta.configlib import (
    apply_overrides,
    dump_yaml,
    from_dict,
    merge_problems,
    read_source,
)
from loretta.data.remote import RETRIES, TIMEOUT_S, FetchOptions
from loretta.errors import ConfigError
from loretta.model.config import DecoderConfig
from loretta.units import parse_size

Precision = Literal["fp32", "bf16", "fp16"]

# Upper bounds that no real run reaches: a value beyond one is a typo (an extra zero, a
# unit slip), caught here instead of as an out-of-memory kill or an overflow much later.
MAX_STEPS = 10**12
MAX_SEQ_LEN = 1 << 20
MAX_ROWS = 1 << 16
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def model_bounds(m: DecoderConfig, p: str = "model") -> list[str]:
    out = []
    for name, hi in (
        ("vocab_size", 1 << 24),
        ("dim", 1 << 16),
        ("n_layers", 4096),
        ("n_heads", 1024),
        ("n_kv_heads", 1024),
        ("ffn_dim", 1 << 20),
        ("multiple_of", 1 << 16),
    ):
        v = getattr(m, name)
        if v > hi:
            out.append(f"{p}.{name}={v}: must be <= {hi}")
    if m.sliding_window is not None and m.sliding_window > MAX_SEQ_LEN:
        out.append(f"{p}.sliding_window={m.sliding_window}: must be <= {MAX_SEQ_LEN} or null")
    if m.norm_eps > 1e-2:
        out.append(f"{p}.norm_eps={m.norm_eps}: must be in (0, 1e-2], e.g. 1e-5")
    if m.init_std > 1:
        out.append(f"{p}.init_std={m.init_std}: must be in (0, 1], e.g. 0.02")
    if m.rope_theta > 1e12:
        out.append(f"{p}.rope_theta={m.rope_theta}: must be in (0, 1e12], e.g. 10000")
    return out


@dataclass
class RunConfig:
    name: str = "loretta"
    run_dir: str = "runs/{name}"  # '{name}' is replaced by run.name
    seed: int = 0
    steps: int = 100  # optimizer steps
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "fp32"

    @property
    def path(self) -> Path:
        return Path(self.run_dir.replace("{name}", self.name))

    def problems(self, p: str = "run") -> list[str]:
        out = []
        if not self.name or "/" in self.name:
            out.append(f"{p}.name={self.name!r}: must be a non-empty name without '/'")
        if not 1 <= self.steps <= MAX_STEPS:
            out.append(f"{p}.steps={self.steps}: must be in [1, {MAX_STEPS:.0e}]")
        if not 0 <= self.seed < 2**63:
            out.append(f"{p}.seed={self.seed}: must be in [0, 2**63)")
        return out


@dataclass
class SynthModality:
    size: int = 64  # local ids 0..size-1
    min_len: int = 8
    max_len: int = 32


@dataclass
class SyntheticConfig:
    """A generated dataset written as real shards (smoke tests, the quickstart), only where the
    source path asks for it: `path: synthetic:FOLDER` (a plain path is always real data).
    Samples are class-conditioned token patterns, so a model can learn them."""

    samples: int = 2000
    classes: int = 10
    seed: int = 0
    modalities: dict[str, SynthModality] = field(default_factory=dict)
    present: list[str] = field(default_factory=list)  # modalities each sample has ([] = all)
    noise: float = 0.1  # share of tokens replaced by uniform noise
    samples_per_shard: int = 500


@dataclass
class SourceConfig:
    name: str = ""
    path: str = ""  # dataset folder or URL holding manifest.json (webdataset tars or MDS), or
    # synthetic:FOLDER to generate the source's synthetic: dataset there on first use
    weight: float = 1.0  # share of training *tokens*
    modalities: list[str] = field(default_factory=list)  # [] = every modality a sample has
    synthetic: SyntheticConfig | None = None


@dataclass
class SequenceConfig:
    order: Literal["random", "fixed"] = "random"  # random: commutative (shuffled modality blocks)
    shuffle_prob: float = 1.0  # random order: chance of a random permutation (else fixed_order)
    fixed_order: list[str] = field(default_factory=list)  # order when fixed ([] = layout order)
    add_bos: bool = True
    add_eos: bool = True
    max_tokens: dict[str, int] = field(default_factory=dict)  # per-modality truncation


@dataclass
class LinkConfig:
    """Transitive link for one source: generate `generate` from the real modality `prompt`
    (through the `via` modalities in turn, for chains), then train [generate', target]."""

    source: str = ""
    generate: str = ""
    prompt: str = ""
    target: str = ""
    via: list[str] = field(default_factory=list)
    # this link's chance that a sample becomes a transitive document; None: the objective's
    # transitive_prob. Links erode and use the generator differently (on SVL-digits the
    # [<speech> S' <image> I] documents erode text -> image generation), so each has its own
    transitive_prob: float | None = None
    # start this link's transitive documents only once the generator it samples from is good
    # enough: when the live monitor's `generation/{prompt}->{generate}` score (class information
    # in generated samples, on monitor.data, a held-out split) reaches this value at a monitor
    # step, and not before objective.transitive_start. None: no gate. The opening row is saved
    # in the loader state, so a resumed run makes the same decisions
    gate: float | None = None
    # how many monitor checks in a row must reach `gate` before it opens (1: the first that
    # does). A check scores monitor.items_per_class items per class, so a generator just below
    # the gate can pass one by chance, and pseudo-modalities from a generator below the gate
    # can erode it (docs/demo-results: the ungated image link on a 902k-parameter model). The
    # count of checks passed so far is saved in checkpoints, so a resumed run counts on
    gate_checks: int = 1


@dataclass
class GenerationConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0: sample from the whole (restricted) distribution
    max_tokens: dict[str, int] = field(default_factory=dict)  # cap for variable-length modalities
    gather: Literal["once", "layers"] = "once"  # ZeRO-3: gather all weights once, or by groups
    layers_per_group: int = 4  # 'layers' mode: layers gathered together per decode step
    batch_size: int = 64  # prompts per generate call
    # decode steps through torch.compile(mode="reduce-overhead") over a static KV cache (CUDA
    # graphs on CUDA); needs gather 'once' (a graph cannot hold the per-group gathers)
    compile_decode: bool = False
    # per-modality decoding: a block of modality m is decoded with these instead of temperature
    # / top_k (e.g. greedy speech and sampled images). The monitor and the demo's by-generation
    # scoring decode each modality the same way
    temperature_by_modality: dict[str, float] = field(default_factory=dict)
    top_k_by_modality: dict[str, int] = field(default_factory=dict)

    def decoding(self, modality: str) -> tuple[float, int]:
        """(temperature, top_k) for blocks of `modality` (top_k 0: off; 1: greedy)."""
        return (
            self.temperature_by_modality.get(modality, self.temperature),
            self.top_k_by_modality.get(modality, self.top_k),
        )


@dataclass
class ObjectiveConfig:
    """LoReTTa: commutative ordering comes from data.sequence; this adds transitive documents."""

    links: list[LinkConfig] = field(default_factory=list)
    transitive_prob: float = 0.5  # chance that a sample with a link becomes [generated', target]
    all_modalities_prob: float = 0.0  # chance of one document with every real + generated block
    # fraction of run.steps before the first transitive document (ours: the paper gives no
    # schedule; generating from a model that cannot yet generate teaches little). Turned into
    # a global row at the run's start and saved; documents are planned per chunk of
    # data.plan_chunk_rows rows, so the start takes effect at the next chunk boundary
    transitive_start: float = 0.0
    loss_on_generated: bool = False  # train on the model's own samples too (default: no)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # negative controls: 'other_class' generates each pseudo-modality from the prompt modality of
    # a sample of another class (its metadata's `control_label_key` differs). Same documents and
    # compute as LoReTTa, no cross-modal information: any gain it shows is not linking. Its
    # documents pair class j with a class other than j, so they teach "not j" (anti-informative).
    # 'any_sample' takes the prompt from another sample of any class (no labels needed):
    # uninformative rather than anti-informative.
    control: Literal["none", "other_class", "any_sample"] = "none"
    control_label_key: str = "label"

    def problems(self, sources: list[str], p: str = "objective") -> list[str]:
        out = []
        # the objective's share and each link's own: in [0, 1], and at most 1 with the
        # all-modalities share (one draw decides between the two)
        shares = [("transitive_prob", self.transitive_prob)] + [
            (f"links.{i}.transitive_prob", lc.transitive_prob)
            for i, lc in enumerate(self.links)
            if lc.transitive_prob is not None
        ]
        for name, v in (
            *shares,
            ("all_modalities_prob", self.all_modalities_prob),
            ("transitive_start", self.transitive_start),
        ):
            if not 0.0 <= v <= 1.0:
                out.append(f"{p}.{name}={v}: must be a probability in [0, 1]")
        for i, lc in enumerate(self.links):
            if lc.gate is not None and not 0.0 <= lc.gate <= 1.0:
                out.append(
                    f"{p}.links.{i}.gate={lc.gate}: must be an accuracy in [0, 1] (the monitor's "
                    f"generation/{lc.prompt}->{lc.generate} score), or null for no gate"
                )
            if not isinstance(lc.gate_checks, int) or lc.gate_checks < 1:
                out.append(
                    f"{p}.links.{i}.gate_checks={lc.gate_checks}: must be an integer >= 1 (the "
                    "monitor checks in a row that must reach the gate; 1: the first opens it)"
                )
        for name, v in shares:
            if 0.0 <= v <= 1.0 and v + self.all_modalities_prob > 1.0 + 1e-9:
                out.append(
                    f"{p}.{name} + all_modalities_prob = {v + self.all_modalities_prob}: "
                    "must not exceed 1"
                )
        if self.control != "none" and not self.links:
            out.append(
                f"{p}.control={self.control!r} needs objective.links (it changes how transitive "
                "documents are generated); remove it or add links"
            )
        if self.control == "other_class" and not self.control_label_key:
            out.append(f"{p}.control_label_key: empty; name the metadata key holding the class")
        g = self.generation
        temps = [("temperature", g.temperature)] + [
            (f"temperature_by_modality.{m}", v) for m, v in g.temperature_by_modality.items()
        ]
        for name, v in temps:
            if not 0 <= v <= 100:
                out.append(f"{p}.generation.{name}={v}: must be in [0, 100] (0 = greedy)")
        top_ks = [("top_k", g.top_k)] + [
            (f"top_k_by_modality.{m}", v) for m, v in g.top_k_by_modality.items()
        ]
        for name, v in top_ks:
            if v < 0:
                out.append(f"{p}.generation.{name}={v}: must be >= 0 (0 = off)")
        for name in ("layers_per_group", "batch_size"):
            v = getattr(g, name)
            if not 1 <= v <= MAX_ROWS:
                out.append(f"{p}.generation.{name}={v}: must be in [1, {MAX_ROWS}]")
        if g.compile_decode and g.gather != "once":
            out.append(
                f"{p}.generation.compile_decode=true needs {p}.generation.gather='once' "
                f"(got {g.gather!r}); set compile_decode: false to gather by layer groups"
            )
        for m, n in g.max_tokens.items():
            if n < 1:
                out.append(f"{p}.generation.max_tokens.{m}={n}: must be >= 1")
        for i, link in enumerate(self.links):
            w = f"{p}.links.{i}"
            if link.source not in sources:
                out.append(f"{w}.source={link.source!r}: no such data source (have {sources})")
            path = [link.prompt, *link.via, link.generate]
            if not link.prompt or not link.generate or not link.target:
                out.append(f"{w}: prompt, generate and target must all be set")
            elif len(set(path)) != len(path):
                out.append(
                    f"{w}: the generation path {' -> '.join(path)} has a cycle; "
                    "each step must produce a new modality"
                )
            elif link.target == link.generate:
                out.append(
                    f"{w}.target={link.target!r} equals generate: nothing real would be "
                    "predicted (the loss skips generated tokens); target a real modality"
                )
        return out


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 256
    micro_batch_size: int = 8  # rows per rank per micro step
    num_workers: int = 0
    prefetch_factor: int = 2
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    mix_by: Literal["tokens", "samples"] = "tokens"  # what source weights are shares of
    # the global stream is planned in chunks of this many rows, each a function of its position
    # (docs/architecture.md, "The global row stream"): a rank plans the chunks holding its rows
    # and their predecessors: about (max(R, B) + R) / B rows planned per own row, whatever the
    # world size. Larger chunks pack better (bench/planner_scale.py --sweep), cost more.
    plan_chunk_rows: int = 16
    plan_fill: float = 0.97  # a chunk's expected tokens / its row tokens (room for overflow)
    pack_lookahead: int = 16  # unused since loader state version 2 (kept so old configs load)
    on_error: Literal["raise", "skip"] = "raise"
    max_skipped: int = 1000  # skip policy: raise after this many bad samples
    verify_checksums: bool = False
    cache_dir: str = ""  # local copies of remote shards ('' = ~/.cache/loretta/shards)
    cache_limit: str = ""  # cache size bound, e.g. 50GB / 10GiB; LRU eviction ('' = none)
    download_retries: int = RETRIES  # attempts per remote file
    download_timeout_s: float = TIMEOUT_S  # per connect and per read (http), per command (pipe:)
    audit: bool = False  # write every consumed (step, source, sample, epoch) to <run_dir>/audit/

    def problems(self, p: str = "data") -> list[str]:
        out = []
        if not self.sources:
            out.append(f"{p}.sources: empty; add at least one {{name, path, weight}} source")
        names = [s.name for s in self.sources]
        for i, s in enumerate(self.sources):
            w = f"{p}.sources.{i}"
            if not s.name:
                out.append(f"{w}.name: empty; give each source a short name")
            elif names.count(s.name) > 1:
                out.append(f"{w}.name={s.name!r}: used by more than one source; names must differ")
            if not s.path:
                out.append(f"{w}.path: empty; point it at a dataset folder with manifest.json")
            if not 0 < s.weight <= 1e6:
                out.append(
                    f"{w}.weight={s.weight}: must be in (0, 1e6] (relative token share of this "
                    "source, e.g. 1.0)"
                )
            if s.synthetic is not None:
                syn = s.synthetic
                if syn.samples < 1 or syn.classes < 1 or syn.samples_per_shard < 1:
                    out.append(f"{w}.synthetic: samples, classes, samples_per_shard must be >= 1")
                if not 0.0 <= syn.noise <= 1.0:
                    out.append(f"{w}.synthetic.noise={syn.noise}: must be a probability in [0, 1]")
                if not syn.modalities:
                    out.append(f"{w}.synthetic.modalities: empty; name at least one modality")
                for m in syn.present:
                    if m not in syn.modalities:
                        out.append(f"{w}.synthetic.present: {m!r} is not in synthetic.modalities")
                for m, sm in syn.modalities.items():
                    if sm.size < 1 or not 1 <= sm.min_len <= sm.max_len:
                        out.append(
                            f"{w}.synthetic.modalities.{m}: need size >= 1 and "
                            f"1 <= min_len <= max_len (got {sm})"
                        )
        if not 8 <= self.seq_len <= MAX_SEQ_LEN:
            out.append(f"{p}.seq_len={self.seq_len}: must be in [8, {MAX_SEQ_LEN}]")
        if not 1 <= self.micro_batch_size <= MAX_ROWS:
            out.append(f"{p}.micro_batch_size={self.micro_batch_size}: must be in [1, {MAX_ROWS}]")
        if not 0 <= self.num_workers <= 256:
            out.append(
                f"{p}.num_workers={self.num_workers}: must be in [0, 256] (0 = main process)"
            )
        if not 1 <= self.prefetch_factor <= 1024:
            out.append(f"{p}.prefetch_factor={self.prefetch_factor}: must be in [1, 1024]")
        if not 1 <= self.pack_lookahead <= MAX_ROWS:
            out.append(f"{p}.pack_lookahead={self.pack_lookahead}: must be in [1, {MAX_ROWS}]")
        if not 1 <= self.plan_chunk_rows <= MAX_ROWS:
            out.append(
                f"{p}.plan_chunk_rows={self.plan_chunk_rows}: must be in [1, {MAX_ROWS}] (rows "
                "planned together; at most data.micro_batch_size keeps planning per rank small)"
            )
        if not 0.5 <= self.plan_fill <= 1.0:
            out.append(
                f"{p}.plan_fill={self.plan_fill}: must be in [0.5, 1.0] (expected share of a "
                "chunk's tokens that documents take; lower leaves room for overflow)"
            )
        if self.max_skipped < 0:
            out.append(f"{p}.max_skipped={self.max_skipped}: must be >= 0")
        for m, n in self.sequence.max_tokens.items():
            if n < 1:
                out.append(f"{p}.sequence.max_tokens.{m}={n}: must be >= 1")
        if len(set(self.sequence.fixed_order)) != len(self.sequence.fixed_order):
            out.append(f"{p}.sequence.fixed_order={self.sequence.fixed_order}: has duplicates")
        if self.cache_limit:
            try:
                parse_size(self.cache_limit, f"{p}.cache_limit")
            except ValueError as e:
                out.append(f"{e}; or empty for no limit")
        if not 1 <= self.download_retries <= 100:
            out.append(
                f"{p}.download_retries={self.download_retries}: must be in [1, 100] (attempts "
                f"per remote file, e.g. {RETRIES})"
            )
        if not 0 < self.download_timeout_s <= 3600:
            out.append(
                f"{p}.download_timeout_s={self.download_timeout_s}: must be in (0, 3600] "
                f"(seconds per connect or read, e.g. {TIMEOUT_S:g})"
            )
        return out

    def fetch_options(self) -> FetchOptions:
        """How remote files are fetched and cached (config validated: the size parses)."""
        limit = parse_size(self.cache_limit, "data.cache_limit") if self.cache_limit else 0
        return FetchOptions(
            retries=self.download_retries, timeout_s=self.download_timeout_s, cache_limit=limit
        )


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1  # not applied to norms and embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    grad_accum_steps: int = 1

    def problems(self, p: str = "optim") -> list[str]:
        out = []
        if not 0 < self.lr <= 1:
            out.append(f"{p}.lr={self.lr}: must be in (0, 1], e.g. 3e-4")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"{p}.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.warmup_steps < 0:
            out.append(f"{p}.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0 <= self.weight_decay <= 1:
            out.append(f"{p}.weight_decay={self.weight_decay}: must be in [0, 1], e.g. 0.1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"{p}.betas={self.betas}: need two values in [0, 1), e.g. [0.9, 0.95]")
        if not 0 < self.eps <= 1e-3:
            out.append(f"{p}.eps={self.eps}: must be in (0, 1e-3], e.g. 1e-8")
        if not 0 <= self.grad_clip <= 1e6:
            out.append(
                f"{p}.grad_clip={self.grad_clip}: must be in [0, 1e6] (0 disables clipping), "
                "e.g. 1.0"
            )
        if not 1 <= self.grad_accum_steps <= 65536:
            out.append(f"{p}.grad_accum_steps={self.grad_accum_steps}: must be in [1, 65536]")
        return out


@dataclass
class EngineConfig:
    deepspeed_config: str = "zero3"  # a name in deepspeed_configs/ or a JSON path
    zero_init: bool = False  # build parameters already partitioned (deepspeed.zero.Init)
    activation_checkpointing: bool = False  # recompute each layer in backward
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 600.0  # collective timeout: a dead rank ends the job after this

    def problems(self, p: str = "engine") -> list[str]:
        out = []
        if not self.deepspeed_config:
            out.append(f"{p}.deepspeed_config: empty; use 'zero3' or a path to a JSON file")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            out.append(
                f"{p}.timeout_s={self.timeout_s}: must be in (0, {MAX_TIMEOUT_S:.0f}] seconds "
                "(7 days), e.g. 600"
            )
        return out


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps (0 = only at the end)
    keep_last: int = 3
    resume: str = "none"  # none | auto (latest complete in the run dir) | a checkpoint path
    save_final: bool = True
    init_from: str = ""  # warm start: a checkpoint, consolidated or Hugging Face folder
    # layout.json of an init_from Hugging Face folder that loretta did not write
    init_layout: str = ""
    # before resuming: 'full' checks every file's size and CRC-32 against manifest.json (reads
    # the checkpoint once, at disk speed); 'size' checks presence and sizes only
    verify: Literal["full", "size"] = "full"

    def problems(self, p: str = "checkpoint") -> list[str]:
        out = []
        if not 0 <= self.interval <= MAX_STEPS:
            out.append(f"{p}.interval={self.interval}: must be >= 0 (0 = only at the end)")
        if not 1 <= self.keep_last <= 10000:
            out.append(f"{p}.keep_last={self.keep_last}: must be in [1, 10000]")
        if not self.resume:
            out.append(f"{p}.resume: empty; use none, auto or a checkpoint folder")
        if self.init_layout and not self.init_from:
            out.append(f"{p}.init_layout={self.init_layout!r}: set only with {p}.init_from")
        return out


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: Literal["auto", "offline", "online", "disabled"] = "auto"  # auto: online with a key
    project: str = "loretta"
    entity: str = ""
    progress: Literal["auto", "always", "never"] = "auto"  # progress bar (auto: on a terminal)
    peak_flops: float = 0.0  # per device, for MFU; 0 = detect (H100/H200/A100 bf16)

    def problems(self, p: str = "logging") -> list[str]:
        out = []
        if not 1 <= self.interval <= MAX_STEPS:
            out.append(f"{p}.interval={self.interval}: must be >= 1")
        if not 0 <= self.peak_flops <= 1e18:
            out.append(
                f"{p}.peak_flops={self.peak_flops}: must be in [0, 1e18] FLOP/s per device "
                "(0 = detect)"
            )
        return out


@dataclass
class MonitorConfig:
    """Live linking monitor: every `interval` steps, on a held-out split, zero-shot retrieval for
    each of `retrieval` (e.g. both directions of the missing pair) and how much class information
    the generator's samples carry for each of `generation` (e.g. text -> image), logged as
    `monitor/...` metrics to metrics.jsonl and wandb. Costs a few forward passes per interval."""

    interval: int = 0  # 0 = off
    data: str = ""  # held-out dataset whose samples hold the modalities and a label in metadata
    label_key: str = "label"
    retrieval: list[list[str]] = field(default_factory=list)  # [[source, target], ...]
    generation: list[list[str]] = field(default_factory=list)  # [[source, target], ...]
    items_per_class: int = 10  # queries per class
    gallery_per_class: int = 3  # held-out items per class the queries are scored against

    def problems(self, p: str = "monitor") -> list[str]:
        out = []
        if self.interval < 0:
            out.append(f"{p}.interval={self.interval}: must be >= 0 (0 = off)")
        if self.interval > 0 and not self.data:
            out.append(f"{p}.data: empty; point it at a held-out dataset (e.g. a val split)")
        if self.interval > 0 and not (self.retrieval or self.generation):
            out.append(f"{p}: interval > 0 but no retrieval or generation pairs to monitor")
        for name, pairs in (("retrieval", self.retrieval), ("generation", self.generation)):
            for i, pair in enumerate(pairs):
                if len(pair) != 2 or pair[0] == pair[1]:
                    out.append(f"{p}.{name}.{i}={pair}: need [source, target], two modalities")
        if self.items_per_class < 1 or self.gallery_per_class < 1:
            out.append(f"{p}: items_per_class and gallery_per_class must be >= 1")
        return out


@dataclass
class FaultConfig:
    nan_policy: Literal["skip", "stop"] = "skip"  # on a non-finite loss or grad norm
    max_nan_skips: int = 10  # skip policy: stop after this many skipped steps
    inject_nan_at: list[int] = field(
        default_factory=list
    )  # testing: poison these steps' loss (1-based)
    crash_in_save_at: list[int] = field(default_factory=list)  # testing: die mid-save at these

    def problems(self, p: str = "faults") -> list[str]:
        out = []
        if self.max_nan_skips < 0:
            out.append(f"{p}.max_nan_skips={self.max_nan_skips}: must be >= 0")
        for name in ("inject_nan_at", "crash_in_save_at"):
            bad = [v for v in getattr(self, name) if v < 1]
            if bad:
                out.append(f"{p}.{name}={bad}: steps are 1-based, must be >= 1")
        return out


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: DecoderConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def problems(self) -> list[str]:
        out = self.run.problems() + self.model.problems() + self.data.problems()
        out += self.optim.problems() + self.engine.problems() + self.checkpoint.problems()
        out += self.logging.problems() + self.faults.problems()
        out += self.objective.problems([s.name for s in self.data.sources])
        out += model_bounds(self.model)
        out += self.monitor.problems()
        if not 0.0 <= self.data.sequence.shuffle_prob <= 1.0:
            out.append(
                f"data.sequence.shuffle_prob={self.data.sequence.shuffle_prob}: must be in [0, 1]"
            )
        if self.optim.warmup_steps > self.run.steps:
            out.append(
                f"optim.warmup_steps={self.optim.warmup_steps} exceeds run.steps={self.run.steps}"
            )
        if self.model.sliding_window is not None and self.model.sliding_window > self.data.seq_len:
            out.append(
                f"model.sliding_window={self.model.sliding_window} exceeds data.seq_len="
                f"{self.data.seq_len}; use null for full attention"
            )
        out += gate_problems(self.objective, self.monitor)
        if self.run.precision == "fp16" and self.run.device == "cpu":
            out.append("run.precision='fp16' is not supported on the CPU; use 'bf16' or 'fp32'")
        return out

    def to_yaml(self) -> str:
        return dump_yaml(self)


def gate_problems(obj: ObjectiveConfig, mon: MonitorConfig) -> list[str]:
    """A gated link needs the monitor to score its generator: on, with the pair listed."""
    out = []
    for i, lc in enumerate(obj.links):
        if lc.gate is None:
            continue
        pair = [lc.prompt, lc.generate]
        if mon.interval <= 0:
            out.append(
                f"objective.links.{i}.gate={lc.gate} needs the live monitor: set monitor.interval "
                "> 0 (the steps between gate checks) and monitor.data (a held-out split)"
            )
        elif pair not in mon.generation:
            out.append(
                f"objective.links.{i}.gate={lc.gate} reads the monitor's generation/"
                f"{lc.prompt}->{lc.generate} score, but monitor.generation={mon.generation}; "
                f"add {pair} to it"
            )
    return out


def load_config(source: str, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe name or YAML path + dotted overrides -> validated TrainConfig (or ConfigError)."""
    data, where = read_source(source)
    problems = apply_overrides(data, list(overrides or []))
    return _build(data, where, problems)


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    return _build(data, where, [])


def _build(data: dict[str, Any], where: str, problems: list[str]) -> TrainConfig:
    """Every problem at once: type problems, then the value checks of every other field."""
    cfg = from_dict(TrainConfig, data, "", problems)
    if isinstance(cfg, TrainConfig):
        try:
            problems = merge_problems(problems, cfg.problems())
        except (TypeError, ValueError, AttributeError) as e:  # a check tripped on a bad type
            problems.append(f"config: {e}")
    if problems:
        raise ConfigError(problems, where)
    return cfg


def memory_estimate(cfg: TrainConfig, world: int) -> dict[str, int]:
    """Bytes one rank needs at the least for one micro step (a floor, not a forecast): the
    logits B*T*V twice in fp32 (the loss's fp32 logits and their gradient), the activations
    kept for backward (each layer's input only, plus one layer's, with activation
    checkpointing), and ZeRO-3's share of weights + Adam state (16 bytes a parameter over the
    ranks). The model's vocab_size must be final (not 0)."""
    m, d = cfg.model, cfg.data
    rows = d.micro_batch_size * d.seq_len
    act = 4 if cfg.run.precision == "fp32" else 2
    per_layer = rows * (6 * m.dim + 2 * m.hidden_dim) * act
    if cfg.engine.activation_checkpointing:
        acts = rows * m.dim * act * m.n_layers + per_layer
    else:
        acts = per_layer * m.n_layers
    return {
        "logits": 2 * 4 * rows * m.vocab_size,
        "activations": acts,
        "states": 16 * m.num_params() // max(1, world),
    }


def available_memory(device_type: str, ranks_on_node: int) -> tuple[int, str]:
    """(bytes one rank may use, where the number comes from)."""
    if device_type == "cuda":
        import torch

        _free, total = torch.cuda.mem_get_info()
        return int(total), "GPU memory (torch.cuda.mem_get_info)"
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ":" in ln}
        avail = info.get("MemAvailable", info.get("MemTotal", 0))
    except (OSError, ValueError):
        return 0, "unknown"
    return avail // max(1, ranks_on_node), f"MemAvailable / {ranks_on_node} rank(s) on this node"


def memory_problems(cfg: TrainConfig, world: int, available: int, source: str) -> list[str]:
    """A problem when the floor of `memory_estimate` exceeds `available` bytes (0 = unknown)."""
    if available <= 0:
        return []
    est = memory_estimate(cfg, world)
    need = sum(est.values())
    if need <= available:
        return []
    gb = 2**30
    d, m = cfg.data, cfg.model
    return [
        f"data.seq_len={d.seq_len} x data.micro_batch_size={d.micro_batch_size} does not fit: "
        f"one micro step needs at least {need / gb:.1f} GiB per rank (logits "
        f"{d.micro_batch_size}x{d.seq_len}x{m.vocab_size} fp32 x2 = {est['logits'] / gb:.1f} "
        f"GiB, activations {est['activations'] / gb:.1f} GiB, weights + optimizer "
        f"{est['states'] / gb:.1f} GiB) but {available / gb:.1f} GiB is available ({source}); "
        "lower data.seq_len or data.micro_batch_size (use optim.grad_accum_steps for a larger "
        "batch)"
    ]
