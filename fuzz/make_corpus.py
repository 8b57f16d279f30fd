#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of kvcache_fuzz_cache (fuzz/corpus/): one scenario per policy x
quantizer x layout variant, in the byte format of fuzz/fuzz_driver.hpp. Deterministic: rerun it
after changing that format, and commit the output. Files named regress-* are inputs that once
found a bug (kept as regression seeds; this script leaves them alone).

    python3 fuzz/make_corpus.py [out_dir]    # default: fuzz/corpus
"""
import os
import sys

POLICIES = ["keep_all", "sink_window", "h2o_attention", "h2o_sums", "snapkv_queries",
            "snapkv_attention", "scale_aware", "sentence_kv"]
# The policy byte of each (driver: run_quant): its index, except sentence_kv (>= 224).
POLICY_BYTE = {"sentence_kv": 224}
QUANTS = ["passthrough", "fp8", "q8_0", "q4_0", "kivi_tok2", "kivi_tok4", "kivi2"]

# Opcodes (op % 16 in driver::step).
OPEN, CLOSE, FORK, APPEND, OBSERVE, EVICT, BUDGET, VIEW, AHEAD, BATCH, SYNC, RECLAIM, TIER = \
    0, 1, 2, 3, 6, 8, 9, 10, 11, 12, 13, 14, 15


def header(policy, quant, *, layers=2, kv_heads=2, group=2, head_dim_sel=0, dtype=1,
           max_tokens=48, budget=24, layout=0, pool=12, p1=4, p2=3, qparam=0):
    # layout byte: bits 0-1 == 3: head_major; bits 2-3 == 3: per_sequence ranges;
    # (byte / 16) % 3: page size 4/16/64 KiB; (byte / 64) % 2: no deferred reclamation.
    return bytes([policy, quant, layers - 1, kv_heads - 1, group - 1, head_dim_sel, dtype,
                  max_tokens - 1, budget, layout, pool - 2, p1, p2, qparam])


def scenario(hostile):
    ops = [
        OPEN, 0, 0,                 # seq 0
        OPEN, 0, 16,                # seq 1, expecting 16 tokens
        APPEND, 0, 0, 20, 0, 1,     # prefill layer 0 of seq 0
        APPEND, 0, 1, 20, 0, 2,     # and layer 1
        OBSERVE, 0, 0, 0, 5,
        OBSERVE, 0, 1, 0, 6,
        EVICT, 0, 1,                # every layer to budget
        FORK, 0,                    # seq 2 shares seq 0's pages
        APPEND, 2, 0, 8, 0, 3,      # copy-on-write in the child
        APPEND, 0, 0, 5, 0, 4,      # and in the parent
        VIEW, 2, 0,
        AHEAD, 2, 0, 2, 10, 0,      # map ahead for seqs 0 and 2
        APPEND, 1, 0, 30, 0, 7,
        SYNC,
        BUDGET, 0, 16,              # every layer keeps 16
        EVICT, 0, 2, 0, 5,          # layer 0 of seq 0, reserve 5
        OBSERVE, 0, 0, 0, 8,
        BATCH, 2, 0, 2, 0,
        CLOSE, 1,
        OPEN, 0, 0,                 # reuses seq 1's ranges
        APPEND, 3, 1, 12, 0, 9,
        VIEW, 0, 1,
        RECLAIM,
        TIER, 0, 1,                 # seq 0 to the holding tier
        APPEND, 0, 0, 4, 0, 9,      # refused: held
        TIER, 0, 2,                 # back
        OBSERVE, 0, 1, 0, 9,
        EVICT, 0, 1,
        TIER, 0, 0, 1,              # prefetch layer 1 of seq 0
        APPEND, 0, 1, 1, 0, 9,      # while an append goes on
        OBSERVE, 0, 1, 0, 10,
        EVICT, 0, 1,
    ]
    if hostile:
        ops += [
            APPEND, 0, 0, 4, 16, 9,     # wrong head count
            APPEND, 0, 0, 4, 17, 9,     # wrong head_dim
            APPEND, 0, 0, 4, 18, 9,     # wrong dtype
            APPEND, 0, 0, 4, 19, 9,     # null data
            APPEND, 0, 0, 4, 20, 9,     # k and v token counts differ
            APPEND, 0, 0, 4, 21, 9,     # NaN/Inf values
            APPEND, 0, 0, 255, 0, 9,    # 2^32-1 tokens
            APPEND, 0, 250, 3, 0, 9,    # layer out of range
            APPEND, 0xF5, 7, 3, 0, 3, 0, 9,  # forged handle
            OBSERVE, 0, 0, 11, 3,       # wrong slot count
            OBSERVE, 0, 0, 14, 3,       # null signal
            BUDGET, 0, 0,               # zero budget
            BUDGET, 0, 255,             # huge budget
            BUDGET, 2, 0, 3, 3,         # per-head budgets (2 kv heads)
            BUDGET, 11, 0, 5, 1, 2, 3, 4, 5,  # per-head budgets, wrong count
            EVICT, 0, 4, 0, 0xFF, 0xFF, 0xFF, 0xFF,  # reserve above the budget
            CLOSE, 1, CLOSE, 1,         # double close: the second is stale
            FORK, 1,                    # fork of a closed sequence
            AHEAD, 1, 1, 5, 0,          # map ahead of a stale id
        ]
    # Exhaust the pool: keep opening and filling until the pages run out, then free and retry.
    for i in range(6):
        ops += [OPEN, 0, 0, APPEND, 4 + i, 0, 40, 0, 10 + i, APPEND, 4 + i, 1, 40, 0, 20 + i]
    ops += [CLOSE, 4, CLOSE, 5, APPEND, 9, 0, 30, 0, 40, SYNC]
    return bytes(ops)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
    os.makedirs(out, exist_ok=True)
    seeds = {}
    for p, pname in enumerate(POLICIES):
        for q, qname in enumerate(QUANTS):
            i = p * len(QUANTS) + q
            # Vary dtype, head_dim and page size across the grid, the rest by variant below.
            base = dict(dtype=i % 3, head_dim_sel=5 if i % 4 == 3 else 0,
                        layout=16 * (i % 3), pool=8 + i % 24)
            p = POLICY_BYTE.get(pname, p)
            seeds[f"{pname}-{qname}"] = header(p, q, **base) + scenario(hostile=(i % 2 == 0))
            if q in (0, 2):  # layouts the formats without metadata ranges take
                seeds[f"{pname}-{qname}-head_major"] = \
                    header(p, q, **{**base, "layout": base["layout"] + 3}) + scenario(True)
                seeds[f"{pname}-{qname}-per_sequence"] = \
                    header(p, q, **{**base, "layout": base["layout"] + 12}) + scenario(False)
            if q == 6:  # a tiny pool without deferred reclamation
                seeds[f"{pname}-{qname}-tiny_pool"] = \
                    header(p, q, **{**base, "layout": 64 + 32, "pool": 4}) + scenario(True)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
