# Copied unchanged (apart from this header) from ../shared/bench/hf_peft_baseline.py, the
# shared GPU baseline of ../shared/docs/GPU.md: the device tool sends only this repository,
# so benchmarks/gpu_train_speed.py runs this copy in the same call as personatune.
# ruff: noqa
"""Baseline LoRA/QLoRA training throughput of the plain transformers+peft path
on a GPU, for Qwen2.5 architectures with random weights (speed does not depend
on weight values). Prints one JSON line per variant and a table at the end."""

import json, os, sys, time, gc
import torch

ARCH = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


def matmul_peak():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t)


def build(name, quant, liger):
    from transformers import Qwen2Config, AutoModelForCausalLM, BitsAndBytesConfig

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()
    cfg = Qwen2Config(
        **ARCH[name],
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        torch_dtype="bfloat16",
    )
    path = f"/tmp/rand-{name}"
    if quant:
        if not os.path.exists(path):
            torch.manual_seed(0)
            with torch.device("cuda"):
                m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
            m.save_pretrained(path)
            del m
            gc.collect()
            torch.cuda.empty_cache()
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        m = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=bnb,
            torch_dtype=torch.bfloat16,
            device_map={"": 0},
            attn_implementation="sdpa",
        )
    else:
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = AutoModelForCausalLM.from_config(
                cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa"
            )
    return m, cfg


def run(name, quant, liger, bs, seq, steps=8, warm=3, peak=None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.cuda.reset_peak_memory_stats()
    m, cfg = build(name, quant, liger)
    if quant:
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    m = get_peft_model(
        m,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (bs, seq), device="cuda")
    m.train()
    for i in range(warm + steps):
        if i == warm:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    tok_s = bs * seq / dt
    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    n_layer = L * (d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size)
    n_mm = n_layer + V * d  # matmul params incl. lm_head
    flops_tok = (
        4 * n_mm + 12 * L * seq * d
    )  # fwd 2N + input-grad bwd 2N (+ attention); recompute not counted
    res = dict(
        model=name,
        quant="nf4" if quant else "bf16",
        liger=liger,
        batch=bs,
        seq=seq,
        s_per_step=round(dt, 3),
        tokens_per_s=int(tok_s),
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        mfu=round(tok_s * flops_tok / peak, 3) if peak else None,
        loss=round(loss.item(), 3),
    )
    print(json.dumps(res), flush=True)
    del m, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    import transformers, peft

    vers = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gpu": torch.cuda.get_device_name(0),
    }
    try:
        import bitsandbytes

        vers["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:
        vers["bitsandbytes"] = repr(e)[:200]
    print(json.dumps(vers), flush=True)
    peak = matmul_peak()
    print(json.dumps({"bf16_matmul_tflops": round(peak / 1e12, 1)}), flush=True)
    plan = [a.split(":") for a in sys.argv[1:]] or [["qwen2.5-0.5b", "0", "0", "8", "1024"]]
    rows = []
    for name, q, lg, bs, seq in plan:
        try:
            rows.append(run(name, q == "1", lg == "1", int(bs), int(seq), peak=peak))
        except Exception as e:
            print(
                json.dumps({"model": name, "quant": q, "liger": lg, "error": repr(e)[:400]}),
                flush=True,
            )
            gc.collect()
            torch.cuda.empty_cache()
    print("| model | quant | liger | batch x seq | tok/s | peak GiB | MFU |")
    for r in rows:
        print(
            f"| {r['model']} | {r['quant']} | {r['liger']} | {r['batch']}x{r['seq']} | {r['tokens_per_s']} | {r['peak_mem_gib']} | {r['mfu']} |"
        )
