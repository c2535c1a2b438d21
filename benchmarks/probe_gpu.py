"""One-off GPU probe: versions, plain-PyTorch ratlm on CUDA, and the attention APIs the fast paths rely on.

Writes $OUT/probe.json. Everything is wrapped so one failure does not hide the others.
"""

import json
import os
import time
import traceback

import torch

OUT = os.environ.get("OUT", "bench-out")
os.makedirs(OUT, exist_ok=True)
res = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)}
try:
    import triton

    res["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    res["triton"] = repr(e)


def probe(name):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001
            res[name] = {"error": traceback.format_exc()[-2000:]}
        res[name + "_seconds"] = round(time.perf_counter() - t0, 2)
        print(name, json.dumps(res[name])[:600], flush=True)
        return fn

    return wrap


dev = "cuda"


@probe("cudnn_lse")
def _():
    B, Hq, Hk, T, d = 2, 8, 2, 256, 128
    q = torch.randn(B, Hq, T, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, Hk, T, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, Hk, T, d, device=dev, dtype=torch.bfloat16)
    out = {}
    for gqa in (False, True):
        kk, vv = (k, v) if gqa else (k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1))
        try:
            r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, kk, vv, None, True, 0.0, True, False, scale=d**-0.5
            )
            o, lse = r[0], r[1]
            ke = kk.repeat_interleave(Hq // kk.shape[1], 1).float()
            ve = vv.repeat_interleave(Hq // vv.shape[1], 1).float()
            s = (q.float() @ ke.transpose(-1, -2)) * d**-0.5
            s = s.masked_fill(~torch.ones(T, T, device=dev, dtype=torch.bool).tril(), float("-inf"))
            ref_lse = torch.logsumexp(s, -1)
            ref_o = torch.softmax(s, -1) @ ve
            info = {
                "n_outputs": len(r),
                "o_shape": list(o.shape),
                "o_strides": list(o.stride()),
                "lse_shape": list(lse.shape),
                "lse_dtype": str(lse.dtype),
                "o_err": (o.float() - ref_o).abs().max().item(),
                "lse_err_natural": (lse.float().reshape(ref_lse.shape) - ref_lse).abs().max().item(),
                "lse_err_log2": (lse.float().reshape(ref_lse.shape) - ref_lse / 0.6931471805599453)
                .abs()
                .max()
                .item(),
            }
            # backward with explicit out / lse
            do = torch.randn_like(o)
            gb = None
            for bias in (None, torch.empty(0, device=dev)):
                try:
                    gb = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                        do,
                        q,
                        kk,
                        vv,
                        o,
                        lse,
                        r[6],
                        r[7],
                        bias,
                        r[2],
                        r[3],
                        r[4],
                        r[5],
                        0.0,
                        True,
                        scale=d**-0.5,
                    )
                    info["bwd_bias_arg"] = "None" if bias is None else "empty"
                    break
                except Exception as e:  # noqa: BLE001
                    info["bwd_bias_" + ("none" if bias is None else "empty") + "_error"] = repr(e)[:300]
            qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, kk, vv))
            ke2 = kr.repeat_interleave(Hq // kr.shape[1], 1)
            ve2 = vr.repeat_interleave(Hq // vr.shape[1], 1)
            s2 = (qr @ ke2.transpose(-1, -2)) * d**-0.5
            s2 = s2.masked_fill(~torch.ones(T, T, device=dev, dtype=torch.bool).tril(), float("-inf"))
            (torch.softmax(s2, -1) @ ve2).backward(do.float())
            info["grad_shapes"] = [list(t.shape) for t in gb]
            info["dq_err"] = (gb[0].float() - qr.grad).abs().max().item() / qr.grad.abs().max().item()
            info["dk_err"] = (gb[1].float() - kr.grad).abs().max().item() / kr.grad.abs().max().item()
            info["dv_err"] = (gb[2].float() - vr.grad).abs().max().item() / vr.grad.abs().max().item()
            out["gqa" if gqa else "expanded"] = info
        except Exception:  # noqa: BLE001
            out["gqa" if gqa else "expanded"] = {"error": traceback.format_exc()[-1500:]}
    return out


@probe("sdpa_backend_default")
def _():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 16, 4096, 128, device=dev, dtype=torch.bfloat16)
    out = {}
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        try:
            with sdpa_kernel(be):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001
            out[name] = repr(e)[:300]
    return out


@probe("flex_lse_grad")
def _():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, C, d, L = 1, 2, 256, 16, 64, 16

    def mask(b, h, qi, ki):
        return qi // L > ki

    bm = create_block_mask(mask, 1, 1, T, C, device=dev)
    q = torch.randn(B, H, T, d, device=dev, requires_grad=True)
    k = torch.randn(B, H, C, d, device=dev, requires_grad=True)
    v = torch.randn(B, H, C, d, device=dev, requires_grad=True)
    fa = torch.compile(flex_attention)
    o, lse = fa(q, k, v, block_mask=bm, return_lse=True)
    (o.sum() + lse[:, :, L:].sum()).backward()
    return {
        "lse_shape": list(lse.shape),
        "chunk0_lse": lse[0, 0, 0].item(),
        "grad_q_finite": bool(q.grad.isfinite().all()),
    }


@probe("ratlm_plain_cuda")
def _():
    import ratlm
    from ratlm.train import lm_loss

    out = {}
    torch.manual_seed(0)
    for layers in ["rat", "attn", "swa", "rnn", "rat,swa"]:
        m = ratlm.LanguageModel(ratlm.preset("rat-small", layers=layers)).to(dev).eval()
        ids = torch.randint(0, 257, (2, 77), device=dev)
        full = m(ids)
        c = m.new_cache(2, 100)
        parts = [m(ids[:, :13], cache=c)] + [m(ids[:, i : i + 1], cache=c) for i in range(13, 77)]
        out[layers + "_cache_err"] = (torch.cat(parts, 1) - full).abs().max().item()
    m = ratlm.LanguageModel(ratlm.preset("rat-small")).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x = torch.randint(0, 257, (16, 257), device=dev)
    for i in range(6):
        if i == 2:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(m, x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    out["rat_small_bf16_step_ms"] = (time.perf_counter() - t0) / 4 * 1e3
    out["loss"] = loss.item()
    return out


with open(os.path.join(OUT, "probe.json"), "w") as f:
    json.dump(res, f, indent=2)
print("wrote", os.path.join(OUT, "probe.json"))
