#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Our smollm engine against llama.cpp (llama-cpp-python) on the same GGUF, text and token ids.

Run through scripts/compare-llama-cpp, which builds llama-cpp-python in a scratch virtual
environment and passes the paths. For each text:
  1. tokenizes a prefix of the text with llama.cpp (Llama.tokenize, add_bos as the GGUF says) and
     with our tokenizer (a helper printing smollm::tokenizer's ids), and compares the first ids;
  2. for each window W, runs llama.cpp on llama.cpp's first W ids with logits for every position:
     f16 K/V cache without and with flash attention, f32 K/V, then q8_0 and q4_0 K/V caches (flash
     attention: llama.cpp needs it for a quantized V cache);
  3. runs our tool on the same ids (--token-ids, --dump-logits) with --quant none/q8_0/q4_0/kivi*
     and with --weights f32, and compares every run's next-token logits with llama.cpp's f16
     full cache (no flash attention): max and mean |diff|, relative L2 norm of the difference,
     mean KL(p_llama || p_run), top-1 agreement; and the perplexities over the same W-1 predictions;
  4. with --exact W (default 2048), also compares every run with a float64 numpy forward pass of the
     same dequantized weights (its own GGUF reader, below): which engine is closer to exact arithmetic.
"""
import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def text_prefix(path, window):
    """The bytes our tool tokenizes for --ppl with this window: window*8+4096 bytes cut at a line end."""
    with open(path, "rb") as f:
        size = window * 8 + 4096
        b = f.read(size)
    if len(b) == size:
        nl = b.rfind(b"\n")
        if nl >= 0:
            b = b[: nl + 1]
    return b


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def perplexity(logits, ids, rows=256):
    nll = 0.0
    n = logits.shape[0]
    for a in range(0, n, rows):
        ls = log_softmax(np.asarray(logits[a : a + rows]))
        tgt = np.asarray(ids[a + 1 : a + 1 + ls.shape[0]])
        nll -= ls[np.arange(ls.shape[0]), tgt].sum()
    return float(np.exp(nll / n))


def compare(ref, run, rows=256):
    """Statistics of run's logits against ref's, both [n][vocab]."""
    n = ref.shape[0]
    assert run.shape == ref.shape, (run.shape, ref.shape)
    maxabs = 0.0
    sumabs = 0.0
    sq_diff = 0.0
    sq_ref = 0.0
    kl = 0.0
    top1 = 0
    maxabs_lp = 0.0  # of log-probabilities, over tokens with p_ref > 1e-4
    for a in range(0, n, rows):
        r = np.asarray(ref[a : a + rows], dtype=np.float64)
        x = np.asarray(run[a : a + rows], dtype=np.float64)
        d = x - r
        maxabs = max(maxabs, float(np.abs(d).max()))
        sumabs += float(np.abs(d).sum())
        sq_diff += float((d * d).sum())
        sq_ref += float((r * r).sum())
        lr, lx = log_softmax(r), log_softmax(x)
        pr = np.exp(lr)
        kl += float((pr * (lr - lx)).sum())
        top1 += int((r.argmax(axis=1) == x.argmax(axis=1)).sum())
        mask = pr > 1e-4
        maxabs_lp = max(maxabs_lp, float(np.abs(lr - lx)[mask].max()))
    return {
        "max_abs": maxabs,
        "mean_abs": sumabs / ref.size,
        "rel_l2": (sq_diff / sq_ref) ** 0.5,
        "mean_kl": kl / n,
        "top1": top1 / n,
        "max_abs_logprob": maxabs_lp,
    }


def ref_stats(ref, rows=256):
    s = 0.0
    sq = 0.0
    for a in range(0, ref.shape[0], rows):
        r = np.asarray(ref[a : a + rows], dtype=np.float64)
        s += float(r.sum())
        sq += float((r * r).sum())
    mean = s / ref.size
    return {"mean": mean, "std": (sq / ref.size - mean * mean) ** 0.5}


# --- an independent float64 reference: a minimal GGUF reader and the Llama forward pass in numpy ---

def read_gguf(path):
    """Metadata (scalars and strings) and tensors (F32/F16/Q4_1/Q8_0 dequantized to float64, numpy shape
    [ne1][ne0]) of a GGUF v2/v3 file."""
    import struct
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        v = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
        pos += n
        return v

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(scalar[t])

    assert bytes(buf[:4]) == b"GGUF", "not a GGUF file"
    pos = 4
    take("I")
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        k = string()
        meta[k] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    align = meta.get("general.alignment", 32)
    base = (pos + align - 1) // align * align
    tensors = {}
    for name, dims, typ, off in infos:
        n = int(np.prod(dims))
        at = base + off
        if typ == 0:
            a = np.frombuffer(buf, dtype="<f4", count=n, offset=at).astype(np.float64)
        elif typ == 1:
            a = np.frombuffer(buf, dtype="<f2", count=n, offset=at).astype(np.float64)
        elif typ == 3:  # Q4_1: f16 d, f16 m, 16 bytes of nibbles (low: elements 0..15, high: 16..31)
            b = np.frombuffer(buf, dtype=np.uint8, count=n // 32 * 20, offset=at).reshape(-1, 20)
            d = b[:, 0:2].copy().view("<f2").astype(np.float64)
            m = b[:, 2:4].copy().view("<f2").astype(np.float64)
            q = np.concatenate([b[:, 4:] & 15, b[:, 4:] >> 4], axis=1).astype(np.float64)
            a = (q * d + m).reshape(-1)
        elif typ == 8:  # Q8_0: f16 d, 32 int8
            b = np.frombuffer(buf, dtype=np.uint8, count=n // 32 * 34, offset=at).reshape(-1, 34)
            d = b[:, 0:2].copy().view("<f2").astype(np.float64)
            q = b[:, 2:].copy().view(np.int8).astype(np.float64)
            a = (q * d).reshape(-1)
        else:
            raise ValueError(f"{name}: tensor type {typ} not handled")
        tensors[name] = a.reshape(list(reversed(dims)))
    return meta, tensors


def exact_logits(model, ids):
    """Next-token logits [len(ids)-1][vocab] of the Llama forward pass in float64 (no quantized activations,
    no fp16 anywhere but the weights as stored)."""
    meta, t = read_gguf(model)
    L = meta["llama.block_count"]
    nh, nkv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps = meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)
    base = meta.get("llama.rope.freq_base", 10000.0)
    emb = t["token_embd.weight"]
    hd = emb.shape[1] // nh
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    ang = pos[:, None] * base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # [T][hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rms(x, w):
        return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * w

    def rope(x):  # [T][heads][hd], ggml "normal" mode: adjacent pairs
        a, b = x[..., 0::2], x[..., 1::2]
        y = np.empty_like(x)
        y[..., 0::2] = a * cos - b * sin
        y[..., 1::2] = a * sin + b * cos
        return y

    x = emb[np.asarray(ids)]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for l in range(L):
        p = f"blk.{l}."
        h = rms(x, t[p + "attn_norm.weight"])
        q = rope((h @ t[p + "attn_q.weight"].T).reshape(T, nh, hd))
        k = rope((h @ t[p + "attn_k.weight"].T).reshape(T, nkv, hd))
        v = (h @ t[p + "attn_v.weight"].T).reshape(T, nkv, hd)
        o = np.empty((T, nh, hd))
        for i in range(nh):
            j = i // (nh // nkv)
            s = q[:, i, :] @ k[:, j, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            o[:, i, :] = (s / s.sum(axis=1, keepdims=True)) @ v[:, j, :]
        x = x + o.reshape(T, -1) @ t[p + "attn_output.weight"].T
        h = rms(x, t[p + "ffn_norm.weight"])
        g = h @ t[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
    out = t.get("output.weight", emb)
    return rms(x[:-1], t["output_norm.weight"]) @ out.T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--smollm", required=True, help="our tool")
    ap.add_argument("--text", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--windows", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--quants", nargs="+", default=["none", "q8_0", "q4_0", "kivi8", "kivi4", "kivi2"])
    ap.add_argument("--llama", nargs="+", default=["f16", "f32", "f16+fa", "q8_0+fa", "q4_0+fa", "q8_0+fa+norot",
                                                   "q4_0+fa+norot"],
                    help="llama.cpp K/V configurations TYPE[+fa][+norot]; the first is the reference")
    ap.add_argument("--f32", action=argparse.BooleanOptionalAction, default=True,
                    help="also run ours with --weights f32 (quant none)")
    ap.add_argument("--chunk", type=int, default=64, help="our --chunk (tokens per forward step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tok-compare", type=int, default=2048, help="compare the first N token ids")
    ap.add_argument("--work", required=True, help="scratch folder (logit dumps)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--exact", type=int, default=2048,
                    help="compare every run with a float64 numpy forward pass too, for windows up to this size (0: never)")
    a = ap.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    os.makedirs(a.work, exist_ok=True)
    results = {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "machine": platform.machine(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "model": a.model,
        "chunk": a.chunk,
        "threads": a.threads,
        "texts": {},
    }
    log("llama.cpp:", results["system_info"])

    # one Llama for tokenizing (vocab only)
    tok_llm = Llama(a.model, vocab_only=True, verbose=False)
    bos = tok_llm.token_bos()
    max_w = max(a.windows)

    for spec in a.text:
        name, path = spec.split("=", 1)
        tr = {"path": path, "windows": {}}
        results["texts"][name] = tr
        prefix = text_prefix(path, max(max_w, a.tok_compare))
        ids_l = tok_llm.tokenize(prefix, add_bos=True, special=False)
        pf = os.path.join(a.work, f"{name}.prefix.txt")
        with open(pf, "wb") as f:
            f.write(prefix)
        out = subprocess.run([a.smollm, "--model", a.model, "--tokenize", pf], check=True, capture_output=True, text=True).stdout
        ids_o = [int(t) for t in out.split()]
        k = a.tok_compare
        first_bad = next((i for i, (x, y) in enumerate(zip(ids_l[:k], ids_o[:k])) if x != y), None)
        same = first_bad is None and len(ids_l) >= k and len(ids_o) >= k
        tr["tokenizer"] = {
            "prefix_bytes": len(prefix),
            "llama_tokens": len(ids_l),
            "our_tokens": len(ids_o),
            "compared": k,
            "identical": same,
            "first_mismatch": first_bad,
            "llama_starts_with_bos": bool(ids_l and ids_l[0] == bos),
            "ours_starts_with_bos": bool(ids_o and ids_o[0] == bos),
            "bos_id": bos,
        }
        if first_bad is not None:
            s = max(0, first_bad - 3)
            tr["tokenizer"]["context_llama"] = [(t, tok_llm.detokenize([t]).decode(errors="replace")) for t in ids_l[s : first_bad + 4]]
            tr["tokenizer"]["context_ours"] = [(t, tok_llm.detokenize([t]).decode(errors="replace")) for t in ids_o[s : first_bad + 4]]
        log(f"[{name}] tokenizer:", json.dumps(tr["tokenizer"]))

        for w in a.windows:
            if len(ids_l) < w:
                log(f"[{name}] only {len(ids_l)} tokens, skipping window {w}")
                continue
            ids = ids_l[:w]
            idf = os.path.join(a.work, f"{name}.{w}.ids")
            with open(idf, "w") as f:
                f.write(" ".join(map(str, ids)) + "\n")
            wr = {"llama": {}, "ours": {}}
            tr["windows"][str(w)] = wr
            ref_path = os.path.join(a.work, f"{name}.{w}.ref.npy")
            ref = None
            exact = None
            exact_path = os.path.join(a.work, f"{name}.{w}.exact.npy")
            if w <= a.exact:
                t0 = time.time()
                e = exact_logits(a.model, ids)
                np.save(exact_path, e.astype(np.float32))
                wr["exact"] = {"ppl": perplexity(e, ids), "seconds": time.time() - t0}
                del e
                gc.collect()
                exact = np.load(exact_path, mmap_mode="r")
                log(f"[{name} W={w}] float64 reference: {json.dumps(wr['exact'])}")
            # llama.cpp runs
            for cfg in a.llama:
                # TYPE[+fa][+norot]: K/V type, flash attention, LLAMA_ATTN_ROT_DISABLE=1 (this llama.cpp rotates
                # Q/K/V by a 64-wide Walsh-Hadamard matrix before a quantized K/V cache; norot turns that off)
                parts = cfg.split("+")
                tk = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                      "q4_0": llama_cpp.GGML_TYPE_Q4_0}[parts[0]]
                fa = "fa" in parts
                if "norot" in parts:
                    os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
                else:
                    os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
                t0 = time.time()
                llm = Llama(a.model, n_ctx=w, n_batch=512, n_ubatch=512, logits_all=True, n_threads=a.threads,
                            n_threads_batch=a.threads, type_k=tk, type_v=tk, flash_attn=fa, verbose=False)
                llm.eval(ids)
                lg = llm.scores[: w - 1]
                if ref is None:
                    np.save(ref_path, lg)
                    del lg, llm
                    gc.collect()
                    ref = np.load(ref_path, mmap_mode="r")
                    lg = ref
                r = {"ppl": perplexity(lg, ids), "seconds": time.time() - t0}
                if exact is not None:
                    r["vs_exact"] = compare(exact, lg)
                if lg is not ref:
                    r.update(compare(ref, lg))
                else:
                    r["ref_stats"] = ref_stats(ref)
                wr["llama"][cfg] = r
                log(f"[{name} W={w}] llama.cpp {cfg}: {json.dumps(r)}")
                del lg
                llm = None
                gc.collect()
            os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
            # our runs
            runs = [(q, "f16") for q in a.quants]
            if a.f32:
                runs.insert(1, ("none", "f32"))
            for q, wf in runs:
                dump = os.path.join(a.work, f"{name}.{w}.ours.f32")
                cmd = [a.smollm, "--model", a.model, "--token-ids", idf, "--window", str(w), "--chunk", str(a.chunk),
                       "--quant", q, "--weights", wf, "--threads", str(a.threads), "--dump-logits", dump]
                t0 = time.time()
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    log(f"[{name} W={w}] ours {q}/{wf} failed: {p.stderr.strip()} {p.stdout.strip()}")
                    wr["ours"][f"{q}/{wf}"] = {"error": (p.stderr or p.stdout).strip()}
                    continue
                m = re.search(r"perplexity ([0-9.]+)", p.stdout)
                run = np.memmap(dump, dtype="<f4", mode="r").reshape(-1, ref.shape[1])
                r = {"ppl_tool": float(m.group(1)) if m else None, "ppl": perplexity(run, ids),
                     "seconds": time.time() - t0}
                r.update(compare(ref, run))
                if exact is not None:
                    r["vs_exact"] = compare(exact, run)
                ours_ref = os.path.join(a.work, f"{name}.{w}.ours-ref.f32")
                if (q, wf) == ("none", "f16"):  # our fp32 cache with fp16 weights: kept to compare --weights f32 with
                    os.replace(dump, ours_ref)
                elif (q, wf) == ("none", "f32") and os.path.exists(ours_ref):
                    oref = np.memmap(ours_ref, dtype="<f4", mode="r").reshape(-1, ref.shape[1])
                    r["vs_ours_f16_weights"] = compare(oref, run)
                    del oref
                wr["ours"][f"{q}/{wf}"] = r
                log(f"[{name} W={w}] ours {q}/{wf}: {json.dumps(r)}")
                del run
                if os.path.exists(dump):
                    os.remove(dump)
            del ref, exact
            os.remove(ref_path)
            if os.path.exists(exact_path):
                os.remove(exact_path)
            if os.path.exists(os.path.join(a.work, f"{name}.{w}.ours-ref.f32")):
                os.remove(os.path.join(a.work, f"{name}.{w}.ours-ref.f32"))

    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print_tables(results)


def print_tables(res):
    print(f"llama-cpp-python {res['llama_cpp_python']}; CPU {res['cpu']}; our --chunk {res['chunk']}, threads {res['threads']}")
    print(f"llama.cpp system info: {res['system_info']}")
    for name, tr in res["texts"].items():
        t = tr["tokenizer"]
        print(f"\n### {name}\n")
        print(f"tokenizer: first {t['compared']} ids {'identical' if t['identical'] else 'DIFFER at ' + str(t['first_mismatch'])}"
              f" (llama.cpp {t['llama_tokens']} / ours {t['our_tokens']} tokens from {t['prefix_bytes']} bytes;"
              f" BOS first: llama.cpp {t['llama_starts_with_bos']}, ours {t['ours_starts_with_bos']})")
        if not t["identical"] and t["first_mismatch"] is not None:
            print(f"  llama.cpp: {t.get('context_llama')}\n  ours:      {t.get('context_ours')}")
        for w, wr in tr["windows"].items():
            rs = wr["llama"]["f16"].get("ref_stats", {})
            print(f"\nwindow {w} (reference: llama.cpp f16 K/V, no flash attention; its logits: "
                  f"mean {rs.get('mean', 0):.3f}, std {rs.get('std', 0):.3f})\n")
            print("| engine | K/V cache | perplexity | max abs diff | mean abs diff | rel. L2 | mean KL (nats) | top-1 agree |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for cfg, r in wr["llama"].items():
                if "max_abs" in r:
                    print(f"| llama.cpp | {cfg} | {r['ppl']:.4f} | {r['max_abs']:.4f} | {r['mean_abs']:.4f} | "
                          f"{r['rel_l2']:.2e} | {r['mean_kl']:.5f} | {100 * r['top1']:.1f}% |")
                else:
                    print(f"| llama.cpp | {cfg} | {r['ppl']:.4f} | — | — | — | — | — |")
            for cfg, r in wr["ours"].items():
                if "error" in r:
                    print(f"| ours | {cfg} | error | | | | | |")
                    continue
                print(f"| ours | {cfg} | {r['ppl']:.4f} | {r['max_abs']:.4f} | {r['mean_abs']:.4f} | "
                      f"{r['rel_l2']:.2e} | {r['mean_kl']:.5f} | {100 * r['top1']:.1f}% |")
            if "exact" in wr:
                print(f"\nagainst a float64 numpy forward pass of the same weights (perplexity {wr['exact']['ppl']:.4f}):\n")
                print("| engine | K/V cache | perplexity | max abs diff | mean abs diff | rel. L2 | mean KL (nats) | top-1 agree |")
                print("| --- | --- | --- | --- | --- | --- | --- | --- |")
                for eng in ("llama", "ours"):
                    for cfg, r in wr[eng].items():
                        v = r.get("vs_exact")
                        if v:
                            print(f"| {'llama.cpp' if eng == 'llama' else 'ours'} | {cfg} | {r['ppl']:.4f} | {v['max_abs']:.4f} | "
                                  f"{v['mean_abs']:.4f} | {v['rel_l2']:.2e} | {v['mean_kl']:.2e} | {100 * v['top1']:.1f}% |")
            for cfg, r in wr["ours"].items():
                v = r.get("vs_ours_f16_weights")
                if v:
                    print(f"\nours {cfg} against ours none/f16 (weights kept as fp32 vs fp16): max abs diff {v['max_abs']:.4f}, "
                          f"mean abs diff {v['mean_abs']:.5f}, rel. L2 {v['rel_l2']:.2e}, mean KL {v['mean_kl']:.2e}, "
                          f"top-1 agree {100 * v['top1']:.1f}%")


if __name__ == "__main__":
    main()
