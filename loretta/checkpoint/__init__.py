"""Checkpoint formats: read ZeRO-3 step folders, consolidated safetensors and Hugging Face folders;
convert between them; load weights for warm starts and inference.

    io.py        files: torch archives via torch.load(mmap, weights_only), safetensors via
                 safe_open, the streaming safetensors writer, YAML/JSON/layout side files
    hf.py        our parameter names and shapes <-> Hugging Face Llama/Mistral, config.json
    tokenizer.py the tokenizer.json of a Hugging Face export (the shared multimodal vocabulary)
    source.py    Source (one tensor at a time), consolidated and Hugging Face folders
    zero.py      ZeRO-3 step folders: every rank's flat fp32 partition -> our parameters
    load.py      open_source, load_model, check_init_source, load_for_init (what training needs)
    export.py    convert(): plan, sharded write into a temporary folder, publish by rename
    verify.py    inspect and verify
    cli.py       loretta-convert

Importing this package imports nothing; deepspeed is never imported here (loretta/engine.py is
the one module that does).
"""
