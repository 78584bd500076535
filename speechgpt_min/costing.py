"""What the full-size recipe costs, worked out without a GPU: parameters, memory, FLOPs, time.

`python train.py --preset speechgpt-7b --dry-run --nproc N` prints it for LLaMA-7B with SpeechGPT's
vocabulary, stage by stage, then the torchrun command of each stage. The arithmetic:

Parameters. The model is built on the "meta" device, where tensors have shapes but no storage: 7B
parameters cost no memory, and counting them is sum(p.numel()). `closed_form_params` gives the
same count as a formula of the config (the tests check both against transformers' LlamaForCausalLM).

Memory per GPU. trainer.py keeps weights, gradients and AdamW's two moments in float32 and runs the
forward under bf16 autocast, so the matrix multiplies run in bf16. For P parameters, P_t of them
trainable, FSDP full-shard over N GPUs keeps on each GPU, exactly (tested against real tensors):
    weights 4 P / N + gradients 4 P_t / N + AdamW 8 P_t / N + a 4-byte step count per trainable tensor
and, as estimates: the layers FSDP holds whole at a time (the root module, i.e. the embeddings,
final norm and lm_head, from forward to backward, and two blocks: one computing, one fetched ahead);
autocast's bf16 copy of every trainable matrix, which it keeps until the forward ends (measured on CPU);
and the activations of one micro-batch of b sequences of T tokens with gradient checkpointing:
each block's input (fp32), one block's saved tensors and their gradients, and the loss head.

FLOPs. A weight of M elements costs 2 M FLOPs per token forward and 4 M backward (the gradient of
its input and of itself): 6 M per token, over the weights every token meets (the matmul weights),
plus attention's scores and weighted sums, 12 L d T per token at context T (the convention of
PaLM, Chowdhery et al. 2022, which named MFU). Under LoRA the frozen weights get no gradient of
their own but still pass the input's gradient down: 4 M_frozen + 6 M_lora. Checkpointing's second
forward is not counted: model-FLOPs utilisation (MFU) counts the model's math once, and says what
fraction of the GPUs' peak it reaches (--mfu: 0.4 by default, an assumption, not a measurement).

Time per step = FLOPs per step / (N x peak x MFU), at the dense bf16 peak of each GPU.
"""
from dataclasses import dataclass

import torch

from .lora import LoRAConfig, inject
from .model import LMConfig, Transformer
from .tokenizer import SPECIAL_TOKENS

GIB = 2**30
PEAK_BF16 = {"A100": 312e12, "H100": 989e12}  # dense bf16 FLOP/s: A100 SXM, H100 SXM (NVIDIA datasheets)
GPUS_PER_NODE = 8                             # more GPUs than this run as nodes of 8


@dataclass(frozen=True)
class Stage:
    name: str
    batch: int      # sequences per optimizer step, over all GPUs
    seq_len: int    # tokens per sequence: stage 1's packed blocks; stages 2 and 3's longest example
    steps: int      # optimizer steps
    lr: float       # peak learning rate
    lora: bool      # only the LoRA matrices train
    micro: int      # at most this many sequences per GPU per forward (ours: 4096 tokens)


# SpeechGPT's three stages. Batches and steps, and stage 1's learning rate, as we read the paper
# (arXiv 2305.11000, section 4.1 and its training table), not re-checked against the PDF here. Lengths
# and the other learning rates are the released training scripts' (github.com/0nutation/SpeechGPT,
# speechgpt/scripts): ma_pretrain.sh --block_size 1024 (it sets no learning rate); cm_sft.sh
# --model_max_length 512 --learning_rate 2e-5; com_sft.sh --model_max_length 1024 --learning_rate 2e-5
# with LoRA r 8, alpha 16 on q_proj, v_proj.
STAGES = (
    Stage("stage1", batch=768, seq_len=1024, steps=900, lr=2e-4, lora=False, micro=4),
    Stage("stage2", batch=1536, seq_len=512, steps=2100, lr=2e-5, lora=False, micro=8),
    Stage("stage3", batch=128, seq_len=1024, steps=4200, lr=2e-5, lora=True, micro=4),
)


def speechgpt_config(lm_preset="llama-7b", n_units=1000):
    """The LM preset with its text vocabulary grown by K unit tokens and the special tokens."""
    text_vocab = LMConfig.from_preset(lm_preset).vocab_size
    return LMConfig.from_preset(lm_preset, vocab_size=text_vocab + n_units + len(SPECIAL_TOKENS))


# ----------------------------------------------------------------------------- parameters

def param_counts(cfg, lora=None):
    """Count by building the model (with LoRA injected, if given) on the meta device: no memory used.
    -> {"total", "trainable", "trainable_tensors"}"""
    with torch.device("meta"):
        model = Transformer(cfg)
        if lora is not None:
            inject(model, lora)  # everything but the LoRA matrices frozen
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in trainable), "trainable_tensors": len(trainable)}


def matrix_shapes(cfg):
    """(in, out) of each matrix of one Block, by module name."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q_proj": (cfg.dim, q), "k_proj": (cfg.dim, kv), "v_proj": (cfg.dim, kv), "o_proj": (q, cfg.dim),
            "gate_proj": (cfg.dim, cfg.ffn_dim), "up_proj": (cfg.dim, cfg.ffn_dim), "down_proj": (cfg.ffn_dim, cfg.dim)}


def block_params(cfg):
    """One Block: seven matrices and two RMSNorm gains."""
    return sum(i * o for i, o in matrix_shapes(cfg).values()) + 2 * cfg.dim


def closed_form_params(cfg):
    """embed_tokens (and an untied lm_head, V x d each) + L blocks + the final norm."""
    embeddings = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.n_layers * block_params(cfg) + cfg.dim


def closed_form_lora_params(cfg, lora):
    """r x (in + out) for every targeted matrix (A is r x in, B is out x r), in every layer."""
    return cfg.n_layers * sum(lora.r * (i + o) for name, (i, o) in matrix_shapes(cfg).items()
                              if name in lora.target_modules)


def matmul_params(cfg):
    """The weights every token is multiplied with: the blocks' matrices and the output head (the
    input embedding is a lookup, not a multiply)."""
    return cfg.n_layers * (block_params(cfg) - 2 * cfg.dim) + cfg.vocab_size * cfg.dim


# ----------------------------------------------------------------------------- memory

def block_activation_bytes(cfg):
    """Bytes one Block saves for backward per token under bf16 autocast, fp32 residual stream in
    (matches what autograd saves on CPU, tests/test_costing.py): each half's fp32 input and RMSNorm
    output (16 d); bf16 casts of the input of q, k, v, gate and up (10 d); q, k, v and the attention's
    output in bf16 (4 d + 4 d_kv); SwiGLU's four ffn-wide bf16 tensors (8 f); fp32 log-sum-exp per
    head and each norm's inverse RMS (4 n_heads + 8)."""
    d, d_kv, f = cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    return 30 * d + 4 * d_kv + 8 * f + 4 * cfg.n_heads + 8


def memory_per_gpu(cfg, counts, n_gpus, micro, seq_len):
    """Bytes on each GPU by part: the first three exact, the rest estimates (see the docstring).
    counts: param_counts(cfg, lora); micro: sequences per GPU per forward, of seq_len tokens."""
    P, P_t, L = counts["total"], counts["trainable"], cfg.n_layers
    lora = P_t < P  # only the LoRA matrices train
    root = closed_form_params(cfg) - L * block_params(cfg)  # embed_tokens, final norm, lm_head
    block = (P - root) / L                                   # a block with its LoRA matrices, if any
    block_grads, root_grads = (P_t / L, 0) if lora else (block, root)
    tokens = micro * seq_len
    return {
        "weights": 4 * P / n_gpus,
        "gradients": 4 * P_t / n_gpus,
        "adamw": 8 * P_t / n_gpus + 4 * counts["trainable_tensors"],
        # no FSDP on one GPU; else whole fp32 weights of the root and two blocks, gradients of the root and one
        "fsdp_whole_layers": 0 if n_gpus == 1 else 4 * (root + 2 * block) + 4 * (root_grads + block_grads),
        # autocast caches a bf16 copy of every trainable matrix until the forward ends; under LoRA the
        # frozen lm_head's copy is kept for its backward (the blocks' are made again when recomputed)
        "autocast_bf16_copies": 2 * (P_t + cfg.vocab_size * cfg.dim if lora else matmul_params(cfg)),
        # every block's fp32 input (checkpoints), one block's saved tensors and as much again of their
        # gradients, and the head: bf16 logits, their fp32 copy and log-softmax (and gradients), ~10 bytes each
        "activations": tokens * (4 * L * cfg.dim + 2 * block_activation_bytes(cfg) + 10 * cfg.vocab_size),
    }


# ----------------------------------------------------------------------------- FLOPs and time

def flops_per_token(cfg, counts, seq_len):
    """Training FLOPs per token, forward and backward (see the docstring)."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    if counts["trainable"] < counts["total"]:  # LoRA: frozen matrices pass gradients, adapters train
        return 4 * matmul_params(cfg) + 6 * counts["trainable"] + attention
    return 6 * matmul_params(cfg) + attention


def split_batch(stage, n_gpus):
    """The stage's batch as TrainConfig takes it: (batch_size, the sequences of one micro-batch over
    all GPUs; grad_accum, micro-batches per step), each GPU taking at most stage.micro at a time."""
    if stage.batch % n_gpus:
        raise ValueError(f"{stage.name}'s batch of {stage.batch} sequences does not split over {n_gpus} GPUs; "
                         f"choose a number of GPUs that divides it")
    per_gpu = stage.batch // n_gpus
    micro = max(m for m in range(1, stage.micro + 1) if per_gpu % m == 0)
    return micro * n_gpus, per_gpu // micro


def plan(cfg, lora, n_gpus, mfu, stages=STAGES):
    """One row per stage: {"stage", "counts", "batch_size", "grad_accum", "tokens", "memory", "flops",
    "seconds": {gpu: per step}}. lora: the LoRAConfig of the stages that train LoRA."""
    rows = []
    for stage in stages:
        counts = param_counts(cfg, lora if stage.lora else None)
        batch_size, grad_accum = split_batch(stage, n_gpus)
        tokens = stage.batch * stage.seq_len  # stages 2 and 3: at most (a batch pads to its longest example)
        flops = flops_per_token(cfg, counts, stage.seq_len) * tokens
        memory = memory_per_gpu(cfg, counts, n_gpus, batch_size // n_gpus, stage.seq_len)
        seconds = {gpu: flops / (n_gpus * peak * mfu) for gpu, peak in PEAK_BF16.items()}
        rows.append(dict(stage=stage, counts=counts, batch_size=batch_size, grad_accum=grad_accum, tokens=tokens,
                         memory=memory, flops=flops, seconds=seconds))
    return rows


def stage_settings(n_gpus=GPUS_PER_NODE):
    """train.py's settings of each stage (TrainConfig fields) for n_gpus. As the released scripts ran
    them: cosine to zero after 3% warmup, no weight decay, transformers' AdamW betas (0.9, 0.999)."""
    settings = {"stage0": dict(steps=0)}  # LLaMA's pretraining is the text pretraining
    for stage in STAGES:
        batch_size, grad_accum = split_batch(stage, n_gpus)
        settings[stage.name] = dict(
            steps=stage.steps, batch_size=batch_size, grad_accum=grad_accum, lr=stage.lr, min_lr=0.0,
            warmup_steps=round(0.03 * stage.steps), weight_decay=0.0, beta2=0.999,
            gradient_checkpointing=True, fsdp=True)
    return settings


# ----------------------------------------------------------------------------- the printout

def launcher(n_gpus):
    """torchrun for n_gpus processes: one node, or nodes of 8 (the same command runs on every node)."""
    if n_gpus <= GPUS_PER_NODE:
        return f"torchrun --standalone --nproc_per_node {n_gpus}"
    if n_gpus % GPUS_PER_NODE:
        raise ValueError(f"{n_gpus} GPUs: more than {GPUS_PER_NODE} run as nodes of {GPUS_PER_NODE}, "
                         f"so use a multiple of {GPUS_PER_NODE}")
    return (f"torchrun --nnodes {n_gpus // GPUS_PER_NODE} --nproc_per_node {GPUS_PER_NODE} "
            f"--rdzv-backend c10d --rdzv-endpoint HOST:29500")


def torchrun_command(row, n_gpus, preset="speechgpt-7b"):
    """The command that trains one stage: stage 1 starts from the LLaMA weights, the others from the
    previous stage's model in the run directory."""
    name = row["stage"].name
    start = " --init-from LLAMA_7B_DIR" if name == "stage1" else ""
    return (f"{launcher(n_gpus)} train.py --preset {preset} --stage {name}{start} --data CORPUS --out runs/{preset} "
            f"--set {name}.batch_size={row['batch_size']} --set {name}.grad_accum={row['grad_accum']}")


def billions(n):
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


MEMORY_PARTS = ("weights", "gradients", "adamw", "fsdp_whole_layers", "autocast_bf16_copies", "activations")


def report(lm_preset, n_units, unit_layer, lora_preset, n_gpus, mfu):
    """The dry run's printout: the model, a row per stage, each stage's memory by part, the commands.
    A stage whose batch does not split over n_gpus is named instead of costed."""
    cfg, lora = speechgpt_config(lm_preset, n_units), LoRAConfig.from_preset(lora_preset)
    stages = [stage for stage in STAGES if stage.batch % n_gpus == 0]
    if not stages:
        raise ValueError(f"no stage's batch ({', '.join(str(s.batch) for s in STAGES)} sequences) splits over "
                         f"{n_gpus} GPUs")
    rows = plan(cfg, lora, n_gpus, mfu, stages)
    commands = [torchrun_command(row, n_gpus) for row in rows]
    text_vocab = cfg.vocab_size - n_units - len(SPECIAL_TOKENS)
    peaks = ", ".join(f"{gpu} {peak / 1e12:.0f} TFLOP/s" for gpu, peak in PEAK_BF16.items())
    lines = [
        f"{lm_preset} built on the meta device: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"FFN {cfg.ffn_dim}, context {cfg.max_seq_len}; vocabulary {text_vocab} text + {n_units} units "
        f"(HuBERT layer {unit_layer}, k-means K={n_units}) + {len(SPECIAL_TOKENS)} special = {cfg.vocab_size}",
        f"{n_gpus} GPU(s){', FSDP full shard' if n_gpus > 1 else ''}; fp32 weights, gradients and AdamW, bf16 "
        f"autocast, gradient checkpointing; stage 3 trains only LoRA r={lora.r}, alpha {lora.alpha:g} on "
        f"{', '.join(lora.target_modules)}",
        f"time per step at MFU {mfu:g} of the dense bf16 peak ({peaks}); in brackets, hours for the stage's steps",
        "",
        f"{'stage':<7}{'params (trainable)':>21}{'batch x len':>13}{'per GPU x accum':>17}{'tokens/step':>13}"
        f"{'GiB/GPU':>9}{'PFLOP/step':>12}" + "".join(f"{gpu + ' s/step (h)':>18}" for gpu in PEAK_BF16),
    ]
    for row in rows:
        stage, counts = row["stage"], row["counts"]
        params = f"{billions(counts['total'])} ({billions(counts['trainable'])})"
        shape, split = f"{stage.batch} x {stage.seq_len}", f"{row['batch_size'] // n_gpus} x {row['grad_accum']}"
        gib = sum(row["memory"].values()) / GIB
        times = "".join(f"{f'{s:.1f} ({s * stage.steps / 3600:.1f})':>18}" for s in row["seconds"].values())
        lines.append(f"{stage.name:<7}{params:>21}{shape:>13}{split:>17}{row['tokens']:>13,}{gib:>9.1f}"
                     f"{row['flops'] / 1e15:>12.1f}{times}")
    lines += [f"{stage.name:<7}its batch of {stage.batch} sequences does not split over {n_gpus} GPUs"
              for stage in STAGES if stage not in stages]
    lines += ["", "GiB/GPU by part: " + " + ".join(MEMORY_PARTS) + " (the last three are estimates)"]
    lines += [f"{row['stage'].name:<7}" + " + ".join(f"{row['memory'][part] / GIB:.1f}" for part in MEMORY_PARTS)
              for row in rows]
    where = ("one node" if n_gpus <= GPUS_PER_NODE else
             f"each run on all {n_gpus // GPUS_PER_NODE} nodes, HOST the first node, runs/ on a shared file system")
    lines += ["", f"commands, one stage at a time, {where} (LLAMA_7B_DIR: Hugging Face LLaMA-7B; CORPUS: a corpus "
                  "in tiny_data's layout, whose units runs/speechgpt-7b holds as units.jsonl and kmeans/config.json):"]
    return "\n".join(lines + commands)
