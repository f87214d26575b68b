"""What the 8B recipes share: instruction tuning on a chat dataset at 2048 tokens, bfloat16 compute, scanned
layers with full remat, the LM loss in chunks, and the memory settings of each method:

    lora   one 80 GB device: base stored in bfloat16, rank-16 adapters on every projection
    qlora  one 80 GB device: base in NF4 (QLoRA), rank-16 adapters
    full   8 devices with FSDP: float32 parameters and AdamW moments sharded over them

Each is checked by the planner in tests/test_recipes.py (with the model's config.json only). The data defaults to
XSum summaries in ../shared/data as a chat task (as configs/xsum_smollm2.py); point `data.train` / `data.eval`
(and the field names) at your own instruction or chat jsonl.
"""

from configs.common import get_config, shared_data

METHODS = ("lora", "qlora", "full")
LEARNING_RATES = {"lora": 2e-4, "qlora": 2e-4, "full": 1e-5}


def recipe(model: str, method: str):
    if method not in METHODS:
        raise ValueError(f"recipe argument: {method!r} is not one of {METHODS}")
    c = get_config()
    c.task = "sft"
    c.model = model
    c.strategy = "full" if method == "full" else "lora"
    c.lora.rank, c.lora.alpha = 16, 32.0
    c.quantize_base = "nf4" if method == "qlora" else "none"
    c.param_dtype = "float32" if method == "full" else "bfloat16"
    c.dtype = "bfloat16"
    c.scan_layers, c.remat, c.lm_loss_chunk = True, "full", 256
    devices = 8 if method == "full" else 1
    c.mesh = {"data": 1, "fsdp": devices, "tensor": 1}
    c.batch_size = 8
    c.grad_accum_steps = 1
    c.max_length, c.buckets = 2048, (512, 1024, 2048)
    c.learning_rate = LEARNING_RATES[method]
    c.weight_decay = 0.0
    c.prompt.chat = True
    xsum = shared_data("xsum", "xsum-1000.jsonl")
    c.data.train, c.data.eval = xsum + "[:90%]", xsum + "[90%:]"
    c.data.input_field, c.data.output_field = "document", "summary"
    c.prompt.template = "Summarize this article in one sentence.\n\n{input}"
    c.max_steps, c.warmup_steps = 1000, 30
    c.eval_every = c.checkpoint_every = 200
    c.early_stopping.metric, c.early_stopping.mode = "eval/loss", "min"
    return c
