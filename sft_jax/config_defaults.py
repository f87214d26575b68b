"""Every config key the trainer reads, with its default. A key that is not here is an error (a typo in a
config or on the command line must not be silently ignored). Experiment configs are diffs on these."""

from __future__ import annotations

import ml_collections
import numpy as np

from sft_jax import sharding
from sft_jax.models.pooling import POOLINGS

DTYPES = ("float32", "bfloat16")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "minilm-l6"  # short name, local Hugging Face directory, .gguf file, or hub id
    # Another tokenizer than the model's own (a directory of tokenizer files, short name, .gguf file or hub id);
    # "": the model's. A model without a usable one is an error, never a run on transformers' 5-token fallback.
    c.tokenizer = ""
    # Regexes (re.search) of checkpoint tensors to drop unread, e.g. ("^classifier\\.",) for another task's head.
    # Any other tensor the model does not use is an error (beside each family's documented non-weights:
    # sft_jax/models/loading/unused.py), so a config.json that disagrees with its weights stops the load.
    c.ignore_weights = ()
    c.task = "text_classification"  # text_classification | language_modeling | sft | image_classification
    c.strategy = "full"  # head | partial | full | lora
    c.frozen_layers = 0  # partial: embeddings and blocks 0..K-1 frozen
    c.pooling = "mean"  # cls | mean
    c.head_dropout = 0.1  # dropout on the pooled features before the classifier head
    # strategy=lora: low-rank adapters on the projections whose module path matches `targets` (re.search). The
    # default names a decoder's attention and MLP projections; text and image classification read it as their
    # backbone's (tasks/classification.py: ENCODER_LORA_TARGETS). A classifier's head trains beside the adapters.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 8  # r: the inner dimension of each adapter (A: in x r, B: r x out)
    c.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
    c.lora.dropout = 0.0  # dropout on the adapters' input during training
    c.lora.targets = r"layers/\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))$"  # regex of the adapted module paths
    c.dtype = "float32"  # compute dtype of the matmuls
    # Storage dtype of the pre-trained parameters (frozen or not); new ones (a classifier head, LoRA adapters)
    # stay float32. bfloat16 halves the weights' memory; trained in bfloat16, their AdamW moments are too.
    c.param_dtype = "float32"
    # Mixed precision: a master copy in this dtype (none | float32) of every trained parameter stored narrower
    # (param_dtype=bfloat16). The optimizer updates the masters (its moments in their dtype too) and the
    # parameters the model reads are cast from them each step, so updates too small for bfloat16 still add up.
    # 4 more bytes per such parameter, and 4 more for each float32 moment. none: updated in their storage dtype.
    c.master_dtype = "none"
    # Activation rematerialisation per block (models/remat.py): none | full (keep only block inputs) | dots (also
    # keep projection outputs) | offload (dots, kept in pinned host memory: GPU / TPU, and XLA:CPU).
    c.remat = "none"
    # Language models: compute the vocabulary logits this many target positions per row at a time (0: all at
    # once). With a large vocabulary the [batch, targets, vocab] float32 logits dominate memory otherwise.
    c.lm_loss_chunk = 0
    # QLoRA (strategy=lora, language models): the frozen base kernels of the adapted projections stored as
    # none | int8 | nf4 (4-bit NormalFloat, double-quantised scales), dequantised inside each matmul.
    c.quantize_base = "none"
    # AdamW's moments stored as float32 | bfloat16 | int8 (block-wise 8-bit, as 8-bit Adam): 8, 4 or ~2 bytes
    # per trained parameter (sft_jax/optim_states.py). The arithmetic stays float32.
    c.optimizer_state_dtype = "float32"
    # Language models: run the decoder's blocks under one scan over stacked parameters (models/scan.py): compile
    # time and program size flat in depth, and remat effective on every backend. Per-layer optimizer groups
    # (llrd, gradual_unfreeze, lp_ft) need it off.
    c.scan_layers = False
    # Decoder attention: auto (splash attention, the Pallas flash kernel, on TPU; jax.nn.dot_product_attention,
    # cuDNN's fused kernel where it applies, on GPU; the blocked XLA attention on CPU) | blocked | dot_product |
    # splash. Soft-capped layers (Gemma 2) stay blocked under dot_product; splash caps them itself.
    c.attention = "auto"
    # On CPU: "onednn" hands the float32 matmuls of the train and eval steps to oneDNN, "xla" leaves XLA:CPU's
    # own, "auto" picks by model: oneDNN for encoders, XLA's for decoders (train_step.CPU_MATMULS); "measure"
    # times the run's own matmul shapes under both, once per CPU model (sft_jax/cpu_matmul_choice.py). No effect
    # on GPU or TPU.
    c.cpu_matmuls = "auto"
    # image_classification with model="vit-scratch": the size of the randomly initialised ViT (HF ViTConfig names).
    c.vit = ml_collections.ConfigDict()
    c.vit.image_size = 32  # input height and width, pixels
    c.vit.patch_size = 4  # side of each square patch, pixels
    c.vit.num_channels = 3  # colour channels of the input
    c.vit.hidden_size = 192  # width of the residual stream
    c.vit.num_hidden_layers = 6  # transformer blocks
    c.vit.num_attention_heads = 3  # attention heads per block
    c.vit.intermediate_size = 768  # width of each block's MLP
    c.vit.hidden_dropout_prob = 0.0  # dropout after attention and MLP
    c.vit.attention_probs_dropout_prob = 0.0  # dropout on the attention weights
    # image_classification: normalisation (used when the checkpoint has no preprocessor_config.json) and
    # training-time augmentation (random crop after padding by `crop_padding` pixels; horizontal flips).
    c.image = ml_collections.ConfigDict()
    c.image.mean = (0.5, 0.5, 0.5)  # per-channel mean subtracted (pixels in [0, 1])
    c.image.std = (0.5, 0.5, 0.5)  # per-channel standard deviation divided by
    c.image.crop_padding = 0  # > 0: pad by this many pixels, then crop at random (train)
    c.image.flip = False  # True: random horizontal flips (train)

    c.data = ml_collections.ConfigDict()
    # Training data: a .jsonl / .tsv / .csv / .parquet / .arrow file, a `datasets` folder DIR[:SPLIT],
    # hf:ORG/NAME[:CONFIG][:SPLIT] (the local Hugging Face cache), an image manifest or folder, or
    # tfds:NAME:SPLIT; FILE[:75%] takes a share of a file.
    c.data.train = ""
    c.data.eval = ""  # evaluation data, in the same forms as data.train
    c.data.text_field = "text"  # field (column) holding the text
    c.data.label_field = "label"  # field (column) holding the class label
    c.data.image_field = "image"  # image records: a path relative to the data file, or image bytes / {"bytes", "path"}
    c.data.classes = ()  # keep only examples of these labels (train, eval); empty: all
    # The classifier's labels, in this order (a head over classes the training data may not all have, e.g. one
    # growing head over a sequence's stages); empty: the labels found in the training data, sorted
    c.data.labels = ()
    # sft records: {"input","output"}, {"instruction","input","output"}, {"instruction","instances"}, {"messages"}
    c.data.input_field = "input"
    c.data.output_field = "output"  # sft: field of the target response
    c.data.instruction_field = "instruction"  # sft: field of the instruction
    c.data.messages_field = "messages"  # sft: field of a chat's [{"role", "content"}] list
    c.data.max_eval_examples = 0  # 0: all
    # > 0: this fraction of the training examples (drawn with the seed) is held out as the validation set that
    # evaluations, early stopping, the best checkpoint and WiSE-FT's alpha select on; data.eval is then evaluated
    # once, on the selected checkpoint, as test/... in results.json. 0: select on data.eval itself
    c.data.validation_fraction = 0.0
    c.data.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data directory; None: TFDS's
    c.data.max_train_examples = 0  # 0: all; else the first N after a seeded shuffle
    # Training batches from windows of this many batches sorted by length (fewer pads: most batches land in a short
    # bucket); a batch then holds sentences of like length. 1: batches of random examples, as most trainers draw
    c.data.group_window = 50
    # True: data.train (.jsonl or .parquet) is read record by record as batches need it, never held in memory
    # (text classification and sft; each process reads its rows; see sft_jax/data/streaming.py)
    c.data.streaming = False
    # Training sources mixed by weight, instead of data.train: ({"train": PATH, "weight": W, "eval": PATH (optional,
    # scored as eval/<name>/...), "name": NAME (default: the file's stem), "format": "" | "text"}, ...). Each
    # source is read like data.train with the same fields ("text": plain documents, every token a target, for
    # decoders: replay of pre-training-like text in sft); each row of each batch comes from a source drawn with
    # probability weight / sum of weights by a hash of (seed, step, row), each source in its own shuffled epochs
    # (sft_jax/data/mixture.py). Empty: data.train alone
    c.data.mixture = ()
    # Image classification: a replay memory added to the training images, `replay_per_class` images of each label
    # in `replay_classes` drawn with the seed from data.train (a class-incremental sequence sets them to the
    # classes of its earlier stages: `stages_replay`); the same images of a class for every run of one seed
    c.data.replay_classes = ()  # labels whose training images are replayed; empty: no replay memory
    c.data.replay_per_class = 0  # images kept per replayed label
    # An example longer than max_length: "truncate" (logged, counted in results.json as data/*_truncated) or
    # "error" (stop, naming its file and line).
    c.data.too_long = "truncate"
    c.max_length = 128  # tokens per example (see data.too_long)
    c.buckets = (32, 64, 128)  # padded lengths: a batch pads to the smallest that fits its longest example

    c.packing = False  # sft / language_modeling: several examples per row (attention stays within each)

    # sft: how a record becomes a prompt ({input}, {instruction}); chat=True renders through the chat template.
    c.prompt = ml_collections.ConfigDict()
    c.prompt.template = "{input}\n"  # records with an input only
    # Records with an instruction and an input.
    c.prompt.instruction_template = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    # Records with an instruction and no input.
    c.prompt.instruction_only_template = "### Instruction:\n{instruction}\n\n### Response:\n"
    c.prompt.chat = False  # True: render the prompt through the tokenizer's chat template
    c.prompt.system = ""  # chat: a system message before each prompt ("": none)

    c.batch_size = 32  # training examples per step (all devices together)
    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide); same update, less memory
    c.eval_batch_size = 128  # examples per evaluation batch
    c.learning_rate = 5e-5  # peak learning rate of AdamW
    c.schedule = "linear"  # decay after warmup: linear | cosine | constant
    c.warmup_steps = 0  # steps of linear warm-up from 0 to learning_rate (0 = none)
    # Warm-up as a fraction of max_steps, in [0, 1) (0 = unused; set warmup_steps or this, not both). It follows
    # max_steps when a run is shortened on the command line, which warmup_steps does not.
    c.warmup_ratio = 0.0
    c.weight_decay = 0.01  # AdamW's decoupled weight decay (biases and norms undecayed)
    c.clip_norm = 1.0  # clip the gradients' global norm to this (0: no clipping)
    c.max_steps = 1000  # optimizer steps of the run
    c.nan_policy = "stop"  # a step with a non-finite loss/gradient is never applied; then: stop | skip
    c.max_train_seconds = 0.0  # > 0: stop after this much training time (equal-compute comparisons); 0: off
    c.seed = 0  # initialisation (head, adapters), data order and dropout
    # True: bit-identical runs and resumes on GPU too (XLA_FLAGS gets --xla_gpu_deterministic_ops=true before the
    # backend starts: slower scatters and reductions; README "Determinism on GPU"). XLA:CPU's kernels are
    # deterministic already: nothing changes there.
    c.deterministic = False

    c.log_every = 20  # steps between training-metric lines (metrics.jsonl, TensorBoard)
    # (first, last): a JAX profiler trace of steps first..last (counted from 1) in WORKDIR/profile, for
    # TensorBoard's profile tab or Perfetto; (): none
    c.profile_steps = ()
    # Experiment trackers beside metrics.jsonl and TensorBoard (process 0 logs): the config once, each train /
    # eval line at its step, results.json at the end. A resumed run appends to the same tracker run (its id is
    # kept in WORKDIR/trackers.json).
    c.logging = ml_collections.ConfigDict()
    c.logging.wandb = ""  # Weights & Biases project ("": off); pip install wandb; WANDB_ENTITY picks the team
    c.logging.wandb_mode = "online"  # online | offline (files under WORKDIR/wandb/ or WANDB_DIR, for `wandb sync`)
    # MLflow tracking URI ("": off), e.g. http://HOST:5000; pip install mlflow-skinny (sqlite:///FILE stores need
    # the full mlflow; file: stores, MLFLOW_ALLOW_FILE_STORE=true in the environment: MLflow 3 refuses them).
    c.logging.mlflow = ""
    c.logging.mlflow_experiment = "sft_jax"  # the MLflow experiment the run goes in (created if missing)
    # Peak FLOP/s of one device in the compute dtype, the denominator of train/mfu; 0: the vendor's figure for
    # known GPUs and TPUs, a measured matmul peak on CPU (sft_jax/trainer/throughput.py)
    c.logging.peak_flops = 0.0
    c.eval_every = 200  # steps between evaluations (and at the end)
    c.checkpoint_every = 200  # steps between checkpoints (latest/; best/ at evaluations)
    c.keep_checkpoints_at = ()  # steps whose whole train state is kept for good (checkpoints/kept/), e.g. to fork
    # "WORKDIR@STEP": start from that run's train state at a kept step (or one in its latest/), with this config
    # (changes that keep the state's structure: learning rate, regularizers, data, steps...); "": from scratch
    c.fork_from = ""
    # Sequential stages, trained in order by one command (WORKDIR/stages/I, each from the previous stage's model;
    # image classification, sft, language_modeling): a list of dicts of the keys each stage changes, as dotted
    # paths, e.g.
    # ({"data.train": A, "data.eval": A_TEST}, {"data.train": B, "data.eval": B_TEST, "learning_rate": 1e-4});
    # the rest is inherited. results.json holds continual/accuracy_matrix, average_accuracy, bwt and fwt.
    c.stages = ()
    # "task": a head per stage (stages with the same labels share one); "class": one head that grows by each
    # stage's new classes (data.labels of stage I: the labels of stages 0..I), scored over every class seen so far
    c.stages_scenario = "task"
    # "class" scenario: images per class of the earlier stages replayed in each later stage (data.replay_*); 0: none
    c.stages_replay = 0
    c.early_stopping = ml_collections.ConfigDict()
    c.early_stopping.metric = "eval/accuracy"  # metric choosing the best checkpoint (and stopping early)
    # auto: min for loss-like metrics (loss, perplexity, ppl, error in the name), else max. An explicit mode
    # against a known metric's direction (max of eval/loss, min of eval/accuracy) is refused.
    c.early_stopping.mode = "auto"  # auto | max | min
    c.early_stopping.patience = 0  # evaluations without improvement before stopping; 0 = never stop

    # sft: generate from the first eval prompts at each evaluation and score the outputs.
    c.eval_generation = ml_collections.ConfigDict()
    c.eval_generation.metrics = ()  # any of rouge (rouge1/2/L), bleu, exact_match (final number, GSM8K)
    c.eval_generation.num_examples = 32  # eval prompts generated from
    c.eval_generation.max_new_tokens = 64  # most tokens generated per prompt
    c.eval_generation.batch_size = 16  # prompts generated together
    c.eval_generation.stop = ()  # stop strings, e.g. ("\n\n",)
    c.eval_generation.log_examples = 3  # printed and appended to WORKDIR/generations.jsonl

    # Fine-tuning that forgets less (README "Forgetting less"). Penalties pull the pre-trained parameters
    # (never the fresh head) back to their starting values: l2sp: weight/2 * |theta - theta0|^2; ewc: the same
    # weighted by the diagonal empirical Fisher (normalised to mean 1) of a pre-training-like objective on
    # `fisher_data` (text: SimCSE for encoders, next-token loss for decoders). At most one of the two.
    c.regularizer = ml_collections.ConfigDict()
    c.regularizer.l2sp = 0.0  # weight of the L2-SP penalty (0: off)
    c.regularizer.ewc = 0.0  # weight of the EWC penalty (0: off)
    c.regularizer.fisher_data = ""  # .txt or .jsonl (field data.text_field) text
    c.regularizer.fisher_batches = 32  # batches the Fisher is estimated from
    c.regularizer.fisher_batch_size = 16  # examples per Fisher batch
    # EWC over several runs (a sequence's stages: online EWC, Schwarz et al. 2018, with no decay): a .npz of Fisher
    # values, one per penalised parameter, added to this run's estimate; keep_fisher writes the Fisher the run
    # penalises with (its estimate plus the prior) to WORKDIR/fisher.npz for the next run
    c.regularizer.fisher_prior = ""  # .npz of an earlier run's Fisher; "": none
    c.regularizer.keep_fisher = False  # write WORKDIR/fisher.npz
    c.llrd = 1.0  # layer-wise learning-rate decay: block i from the top learns at llrd**i x (1 = off)
    c.gradual_unfreeze = ml_collections.ConfigDict()
    c.gradual_unfreeze.every = 0  # > 0: head first, then `blocks` more blocks (top-down) every N steps
    c.gradual_unfreeze.blocks = 1  # blocks unfrozen at each stage
    c.lp_ft = ml_collections.ConfigDict()
    c.lp_ft.head_steps = 0  # > 0: LP-FT, the head alone for N steps, then everything the strategy trains
    c.lp_ft.head_learning_rate = 0.0  # the head's learning rate during those steps; 0: learning_rate
    c.drift = ml_collections.ConfigDict()
    # True: how far the weights moved from the pre-trained ones, per block (relative change, effective rank and
    # top singular value share of the change; sft_jax/drift.py), at every evaluation (drift/... in
    # metrics.jsonl), for the best checkpoint in results.json, and plotted per block in WORKDIR/drift.png
    c.drift.params = False
    # True: linear CKA between each block's output hidden states of the pre-trained and of the current model, on
    # the real tokens of the reference inputs (drift/cka/block_I and drift/cka/mean; sft_jax/representation_drift.py),
    # at every evaluation, for the best checkpoint, and plotted per block in WORKDIR/drift.png
    c.drift.cka = False
    # True (decoder LMs): KL(pre-trained || current) of the next-token distributions, the mean over the real
    # tokens of the reference inputs (drift/kl_next_token), logged as drift.cka is
    c.drift.kl = False
    # The reference inputs of drift.cka / drift.kl: the first N evaluation examples, one batch, the same at every
    # evaluation. The probe runs the pre-trained and the current model on them (the trained tensors' pre-trained
    # values kept on the host, put on the devices while it runs); a decoder's two [N, length, vocab] logits too
    c.drift.reference_examples = 16
    c.wise_ft = ml_collections.ConfigDict()
    # After training: evaluate (1 - a) * pre-trained + a * fine-tuned (head kept) for each a; results.json
    # gets wise_ft/<a>/eval/... and wise_ft/<a>/forgetting/...
    c.wise_ft.alphas = ()

    c.forgetting = ml_collections.ConfigDict()
    c.forgetting.stsb = ""  # STS-B dev TSV (or its folder); empty: no probe
    # Images: labelled eval data of the model's source task (any image data spec; only the source head's
    # classes are kept), scored with the model's original head on the backbone before and after.
    c.forgetting.images = ""
    c.forgetting.every_eval = False  # also run the probes at every evaluation (metrics.jsonl: forgetting/...)
    # Decoders: WikiText-2 raw test perplexity before/after (folder or file; empty: no probe).
    c.forgetting.wikitext2 = ""
    c.forgetting.wikitext2_max_tokens = 0  # 0: the whole test set; else its first N tokens (a faster probe)
    c.forgetting.wikitext2_max_length = 512  # window length
    c.forgetting.wikitext2_stride = 511  # window step, < max_length; max_length - 1: disjoint windows (cheapest)
    # Decoders: lm-evaluation-harness tasks scored before/after (task names, e.g. ("hellaswag", "arc_easy");
    # empty: no probe); each metric is forgetting/lm_eval/TASK/METRIC. Needs `pip install lm_eval==0.4.13`.
    c.forgetting.lm_eval_tasks = ()
    c.forgetting.lm_eval_include_path = ""  # a folder of task YAML files of your own, beside the harness's
    c.forgetting.lm_eval_limit = 0  # 0: every document of each task; else its first N (a faster probe)

    # Device mesh: the product of the axes' sizes is the device count; -1 on one axis: the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data parallelism: the batch split, parameters replicated (unless fsdp)
    c.mesh.fsdp = 1  # fully sharded data parallelism: the batch and the parameters split
    c.mesh.tensor = 1  # tensor (Megatron) parallelism: heads and MLP columns split
    # ((logical axis, mesh axis | (mesh axes) | None), ...): where each logical axis of parameters and activations
    # goes (names: sharding.LOGICAL_AXES; unlisted ones are replicated). The default is Megatron-style FSDP x
    # tensor parallelism: batch over data x fsdp, embed over fsdp, heads / kv_heads / mlp / vocab over tensor.
    c.logical_axis_rules = sharding.DEFAULT_LOGICAL_RULES
    # ((regex, partition-spec tuple), ...): the first match on a parameter's path overrides its logical layout.
    c.sharding_rules = ()
    # "auto": parameters and activations follow logical_axis_rules (on a data-only mesh: replicated parameters);
    # "none": every parameter replicated (except those sharding_rules name), activations unconstrained.
    c.sharding_preset = "auto"
    # Multi-host (jax.distributed.initialize): every process runs the same command with its own process_id.
    # Empty / 0 / -1: taken from the environment (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, Cloud TPU).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0; empty: single process unless auto
    c.distributed.num_processes = 0  # processes in the run (0: from the environment)
    c.distributed.process_id = -1  # this process's index (-1: from the environment)
    c.distributed.auto = False  # True: initialize from the cluster environment alone
    # How long processes wait for each other to join, and for a silent one before all stop with one line naming
    # it (sft_jax/peer_watch.py); JAX's own heartbeat abort is the backstop at 3x.
    c.distributed.timeout_s = 300
    return c


def _check_profile_steps(steps) -> None:
    if steps and not (len(steps) == 2 and all(isinstance(s, int) for s in steps) and 1 <= steps[0] <= steps[1]):
        raise ValueError(f"config.profile_steps: expected () or (first, last) with 1 <= first <= last, got "
                         f"{tuple(steps)!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first unknown key or invalid value; the task of `config.task` checks the
    options that are its own (`sft_jax.tasks.check_config`)."""
    _check_keys(config, defaults(), "")
    _check_finite(config, "")
    from sft_jax.strategies import STRATEGIES

    if config.strategy not in STRATEGIES:
        raise ValueError(f"config.strategy: unknown strategy {config.strategy!r}; expected one of {STRATEGIES}")
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype: {config.dtype!r} is not one of {DTYPES}")
    _check_choice(config, "param_dtype", DTYPES)
    _check_choice(config, "master_dtype", ("none", "float32"))
    _check_choice(config, "remat", ("none", "full", "dots", "offload"))
    _check_choice(config, "quantize_base", ("none", "int8", "nf4"))
    _check_choice(config, "optimizer_state_dtype", ("float32", "bfloat16", "int8"))
    _check_choice(config, "attention", ("auto", "blocked", "dot_product", "splash"))
    _check_choice(config, "schedule", ("linear", "cosine", "constant"))
    _check_choice(config, "cpu_matmuls", ("auto", "measure", "xla", "onednn"))
    _check_choice(config, "pooling", POOLINGS)
    _check_choice(config, "stages_scenario", ("task", "class"))
    if len(set(config.data.labels)) != len(config.data.labels):
        raise ValueError(f"config.data.labels: a label given twice in {tuple(config.data.labels)}")
    _check_choice(config, "data.too_long", ("truncate", "error"))
    _check_choice(config, "logging.wandb_mode", ("online", "offline"))
    for key in ("learning_rate", "warmup_steps", "weight_decay", "clip_norm", "head_dropout", "max_train_seconds",
                "logging.peak_flops", "data.max_train_examples", "data.max_eval_examples", "lora.dropout",
                "lm_loss_chunk"):
        if _get(config, key) < 0:
            raise ValueError(f"config.{key}: must be >= 0, got {_get(config, key)}")
    if config.data.group_window < 1:
        raise ValueError(f"config.data.group_window: batches per sorted window, >= 1, got {config.data.group_window}")
    _check_warmup(config)
    _check_profile_steps(config.profile_steps)
    if not all(isinstance(s, int) and s >= 1 for s in config.keep_checkpoints_at):
        raise ValueError(f"config.keep_checkpoints_at: expected steps >= 1, got {tuple(config.keep_checkpoints_at)!r}")
    if config.fork_from:
        from sft_jax.trainer.fork import parse

        parse(config.fork_from)
    _check_replay(config)
    if not 0 <= config.data.validation_fraction < 1:
        raise ValueError(f"config.data.validation_fraction: must be in [0, 1), got {config.data.validation_fraction}")
    for axis, size in config.mesh.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis}: must be a positive int or -1 (the remaining devices), got {size!r}")
    for key in ("batch_size", "eval_batch_size", "max_steps", "log_every", "eval_every", "checkpoint_every",
                "max_length"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key}: must be positive, got {config[key]}")
    if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
        raise ValueError(f"config.grad_accum_steps: {config.grad_accum_steps} must be >= 1 and divide "
                         f"batch_size={config.batch_size}")
    if config.frozen_layers < 0:
        raise ValueError(f"config.frozen_layers: must be >= 0, got {config.frozen_layers}")
    from sft_jax.evaluate.text_metrics import METRICS

    unknown = [m for m in config.eval_generation.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"config.eval_generation.metrics: unknown {unknown}; expected some of {METRICS}")
    if config.sharding_preset not in ("auto", "none"):
        raise ValueError(f"config.sharding_preset: {config.sharding_preset!r} is not auto or none")
    sharding.check_logical_rules(config.logical_axis_rules)
    sharding.check_regex_rules(config.sharding_rules)
    d = config.distributed
    if d.num_processes < 0 or d.process_id < -1 or (d.num_processes and d.process_id >= d.num_processes):
        raise ValueError(f"config.distributed: process_id={d.process_id} must be in [0, num_processes="
                         f"{d.num_processes}) (or -1 / 0 to take them from the environment)")
    if d.coordinator_address and ":" not in d.coordinator_address:
        raise ValueError(f"config.distributed.coordinator_address: {d.coordinator_address!r} is not host:port")
    if d.timeout_s <= 0:
        raise ValueError(f"config.distributed.timeout_s: must be positive, got {d.timeout_s}")
    if not isinstance(config.deterministic, bool):
        raise ValueError(f"config.deterministic: must be True or False, got {config.deterministic!r}")
    if config.nan_policy not in ("stop", "skip"):
        raise ValueError(f"config.nan_policy: {config.nan_policy!r} is not stop or skip")
    from sft_jax.models.loading.unused import check_ignore_patterns

    check_ignore_patterns(config.ignore_weights)
    _validate_images(config)
    _validate_forgetting(config)
    if not config.stages:  # a sequence's stages may each give their own (they are validated one by one)
        if not config.data.train and not config.data.mixture:
            raise ValueError("config.data.train: no training data given")
        if not config.data.eval:
            raise ValueError("config.data.eval: no evaluation data given")
    buckets = config.buckets
    if isinstance(buckets, str) or not buckets or not all(type(b) is int and b > 0 for b in buckets):
        raise ValueError(f"config.buckets: must be a non-empty tuple of positive lengths, got {buckets!r}")
    if max(config.buckets) < config.max_length:
        raise ValueError(f"config.buckets: the largest bucket {max(config.buckets)} is below "
                         f"max_length={config.max_length}")
    from sft_jax import tasks

    tasks.check_config(config)
    early_stopping_mode(config.early_stopping)  # after the task has said the metric is one of its own


# Substrings of metric names that are lower-is-better, and of those that are higher-is-better.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error")
_HIGHER_IS_BETTER = ("accuracy", "f1", "rouge", "bleu", "exact_match", "spearman", "pearson", "precision", "recall")


def early_stopping_mode(stopping: ml_collections.ConfigDict) -> str:
    """"max" or "min": the direction in which `stopping.metric` improves. `mode="auto"` follows the metric's name
    (loss-like names minimise, others maximise); an explicit mode against a known direction is refused.

    Raises:
      ValueError: one line naming config.early_stopping.mode, the metric and the mode it needs.
    """
    metric, mode = stopping.metric, stopping.mode
    name = metric.rsplit("/", 1)[-1].lower()
    known = "min" if any(k in name for k in _LOWER_IS_BETTER) else (
        "max" if any(k in name for k in _HIGHER_IS_BETTER) else None)
    if mode == "auto":
        return known or "max"
    if mode not in ("max", "min"):
        raise ValueError(f"config.early_stopping.mode: {mode!r} is not auto, max or min")
    if known and mode != known:
        better = "lower" if known == "min" else "higher"
        raise ValueError(f"config.early_stopping.mode: {mode!r} contradicts metric {metric!r}, where {better} is "
                         f"better: the best checkpoint would be the worst; use {known!r} or 'auto'")
    return mode


def _validate_images(config: ml_collections.ConfigDict) -> None:
    image = config.image
    if len(image.mean) != 3 or len(image.std) != 3 or min(image.std) <= 0:
        raise ValueError(f"config.image.mean / std: three values each, std > 0; got {tuple(image.mean)}, "
                         f"{tuple(image.std)}")
    if image.crop_padding < 0:
        raise ValueError(f"config.image.crop_padding: must be >= 0, got {image.crop_padding}")
def _check_replay(config: ml_collections.ConfigDict) -> None:
    d = config.data
    if d.replay_per_class < 0 or config.stages_replay < 0:
        raise ValueError("config.data.replay_per_class and config.stages_replay: must be >= 0")
    if bool(d.replay_classes) != bool(d.replay_per_class):
        raise ValueError("config.data.replay_classes and config.data.replay_per_class: set both (the classes to "
                         "replay and how many images of each) or neither")
    if d.replay_classes and config.task != "image_classification":
        raise ValueError(f"config.data.replay_classes: a replay memory of images is for image_classification, not "
                         f"{config.task!r} (text and LM runs mix earlier data in with data.mixture)")
    if config.stages_replay and not (config.stages and config.stages_scenario == "class"):
        raise ValueError("config.stages_replay: replays earlier stages' classes under one growing head, so it needs "
                         "config.stages with stages_scenario='class' (a head per stage cannot score replayed "
                         "images of other stages' classes)")


def _validate_forgetting(config: ml_collections.ConfigDict) -> None:
    r = config.regularizer
    for key in ("l2sp", "ewc"):
        if not r[key] >= 0:
            raise ValueError(f"config.regularizer.{key}: must be >= 0, got {r[key]}")
    if r.l2sp and r.ewc:
        raise ValueError("config.regularizer: set l2sp or ewc, not both")
    if (r.fisher_prior or r.keep_fisher) and not r.ewc:
        raise ValueError("config.regularizer.fisher_prior / keep_fisher: only EWC (regularizer.ewc > 0) has a Fisher")
    if r.ewc and not r.fisher_data:
        raise ValueError("config.regularizer.fisher_data: ewc needs data to estimate the Fisher on")
    if r.fisher_batches < 1 or r.fisher_batch_size < 2:
        raise ValueError("config.regularizer: fisher_batches must be >= 1 and fisher_batch_size >= 2")
    if not 0 < config.llrd <= 1:
        raise ValueError(f"config.llrd: the decay factor must be in (0, 1], got {config.llrd}")
    g, lp = config.gradual_unfreeze, config.lp_ft
    if g.every < 0 or g.blocks < 1:
        raise ValueError(f"config.gradual_unfreeze: every must be >= 0 and blocks >= 1, got {g.every}, {g.blocks}")
    if lp.head_steps < 0 or lp.head_learning_rate < 0:
        raise ValueError("config.lp_ft: head_steps and head_learning_rate must be >= 0")
    if g.every and lp.head_steps:
        raise ValueError("config.gradual_unfreeze.every and config.lp_ft.head_steps both set when groups start; "
                         "use one of them")
    if (g.every or lp.head_steps) and config.strategy == "head":
        raise ValueError("config.strategy: head trains only the head; gradual unfreezing and LP-FT need partial, "
                         "full or lora")
    bad = [a for a in config.wise_ft.alphas if not 0 <= float(a) <= 1]
    if bad:
        raise ValueError(f"config.wise_ft.alphas: {bad} outside [0, 1]")
    if (config.drift.cka or config.drift.kl) and config.drift.reference_examples < 1:
        raise ValueError(f"config.drift.reference_examples: must be >= 1, got {config.drift.reference_examples}")


def _check_keys(config, reference, prefix: str) -> None:
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ValueError(f"unknown config key {name!r}")
        if isinstance(reference[key], ml_collections.ConfigDict) and key != "mesh":
            _check_keys(config[key], reference[key], name + ".")


def _check_finite(config, prefix: str) -> None:
    """Every float option (rates, decays, clipping, dropouts, weights, alphas, and those in tuples) is a finite
    float32: nan passes every `< 0` check, and a value beyond float32's range becomes inf on the device."""
    f32_max = float(np.finfo(np.float32).max)
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite(value, f"{prefix}{key}.")
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, (float, np.floating)) and not -f32_max <= v <= f32_max:
                raise ValueError(f"config.{prefix}{key}: must be a finite number, got {value!r}")


def _check_warmup(config) -> None:
    if not 0 <= config.warmup_ratio < 1:
        raise ValueError(f"config.warmup_ratio: must be in [0, 1), got {config.warmup_ratio}")
    if config.warmup_ratio and config.warmup_steps:
        raise ValueError(f"config.warmup_steps={config.warmup_steps} and config.warmup_ratio={config.warmup_ratio}: "
                         "set one of them (the other 0)")


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _check_choice(config, dotted: str, choices: tuple[str, ...]) -> None:
    if _get(config, dotted) not in choices:
        raise ValueError(f"config.{dotted}: {_get(config, dotted)!r} is not one of {choices}")
