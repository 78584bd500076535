"""Peak memory of loading LLaMA-7B-sized weights, against their size on disk.

Writes random bf16 weights of the `llama-7b` preset as sharded safetensors (~13.5 GB) into a
temporary directory, then, in a fresh process, loads them with speechgpt_min.weights.load_pretrained
(bf16), runs one forward step on a short input on the CPU, and reports the peak resident memory
(VmHWM) of that process against the bytes on disk. The temporary directory is deleted at the end.

Needs ~15 GB of free disk and ~16 GB of free RAM; takes a few minutes.

    python benchmarks/bench_llama7b_load.py
    python benchmarks/bench_llama7b_load.py --dir /big/tmp --shard-gb 5
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 2**30


def vm_hwm_bytes():
    """Peak resident set size of this process (VmHWM in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def mem_available_bytes():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def checkpoint_bytes(preset):
    from speechgpt_min.model import LMConfig, Transformer
    with torch.device("meta"):
        return Transformer(LMConfig.from_preset(preset)).num_params() * 2  # bf16


def write_random(path, shard_gb, preset):
    """Random bf16 weights of an LM preset, written shard by shard so that only one shard is in memory."""
    from safetensors.torch import save_file

    from speechgpt_min.model import LMConfig, Transformer
    from speechgpt_min.weights import HF_NAMES, config_to_hf, source_names

    cfg = LMConfig.from_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    hf_name = {ours: hf for hf, ours in source_names(HF_NAMES, model).items()}
    shapes = {hf_name[k]: v.shape for k, v in model.state_dict().items()}
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.bfloat16, 1, 2), indent=2))

    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > shard_gb * GB:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n], dtype=torch.bfloat16) if n.endswith("norm.weight") else
                       torch.empty(shapes[n], dtype=torch.bfloat16).normal_(0, 0.02, generator=g)) for n in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        print(f"  wrote {file} ({sum(t.numel() * 2 for t in tensors.values()) / GB:.2f} GB)", flush=True)
    index = {"metadata": {"total_size": sum(s.numel() * 2 for s in shapes.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def load_and_step(path):
    """Load with our loader, one forward step; print a JSON line of measurements."""
    from speechgpt_min.weights import load_pretrained

    start = time.perf_counter()
    model = load_pretrained(path, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    after_load = vm_hwm_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 450, 7483, 310, 3444, 338, 3681, 29889]]))  # (1, 8, vocab)
    step_s = time.perf_counter() - start
    print(json.dumps({"load_s": load_s, "step_s": step_s, "peak_after_load": after_load, "peak": vm_hwm_bytes(),
                      "params": model.num_params(), "finite": bool(torch.isfinite(logits).all()),
                      "logits_shape": list(logits.shape)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to make the temporary directory (default: system temp)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size of the written checkpoint")
    parser.add_argument("--preset", default="llama-7b", help="LM preset (a smaller one for a quick trial run)")
    parser.add_argument("--load-only", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.load_only:
        load_and_step(args.load_only)
        return

    base = args.dir or Path(tempfile.gettempdir())
    free_disk, free_ram = shutil.disk_usage(base).free, mem_available_bytes()
    need = 1.2 * checkpoint_bytes(args.preset)
    print(f"free disk at {base}: {free_disk / GB:.1f} GB, available RAM: {free_ram / GB:.1f} GB, "
          f"needed: ~{need / GB:.1f} GB of each")
    if free_disk < need or free_ram < need:
        sys.exit("not enough free disk or available RAM; stopping")
    path = Path(tempfile.mkdtemp(prefix="llama7b-", dir=base))
    try:
        print(f"writing random bf16 {args.preset} weights to {path}")
        start = time.perf_counter()
        write_random(path, args.shard_gb, args.preset)
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"wrote {disk / GB:.2f} GB in {time.perf_counter() - start:.0f} s")
        # a fresh process, so that the writer's memory does not count
        out = subprocess.run([sys.executable, __file__, "--load-only", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"loading failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"loaded {r['params'] / 1e9:.2f}B parameters in {r['load_s']:.1f} s; forward of 8 tokens "
              f"{r['step_s']:.1f} s, logits {r['logits_shape']} finite: {r['finite']}")
        print(f"bytes on disk (safetensors): {disk / GB:.2f} GB")
        print(f"peak RSS after load:         {r['peak_after_load'] / GB:.2f} GB  ({r['peak_after_load'] / disk:.3f}x disk)")
        print(f"peak RSS after forward:      {r['peak'] / GB:.2f} GB  ({r['peak'] / disk:.3f}x disk)")
    finally:
        shutil.rmtree(path)
        print(f"deleted {path}")


if __name__ == "__main__":
    main()
