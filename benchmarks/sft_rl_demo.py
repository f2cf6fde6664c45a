"""SFT then RL on a real model (issue 22.5): SmolLM2-135M-Instruct on reasoning-gym's gsm_symbolic
or chain_sum.

    python benchmarks/sft_rl_demo.py data  --out DIR [--task chain_sum]  # SFT messages, RL prompts: train/eval
    python benchmarks/sft_rl_demo.py eval  --model HF_DIR --data DIR/eval_rl.jsonl [--n 64]

``data`` writes, from reasoning-gym (seeded, offline): ``sft.jsonl`` (``messages``: the question,
then the worked solution ending in ``#### N`` as the assistant's turn), ``rl.jsonl`` (``prompt``
+ ``label``, disjoint problems), ``eval_rl.jsonl`` and ``eval_sft.jsonl`` (held-out, another seed).
With ``--task chain_sum`` (the real-model recipe's task: two terms of one or two digits) the
assistant's turn is the worked sum (``47 + 8 = 55``), the held-out problems are the recipe's own
held-out file's (no expression of them in any training row), and the base model already answers
about a third of them, so both stages have room to show.
``eval`` measures greedy held-out accuracy (``#### N`` or the last number equals the label, the
``--rm-type gsm8k`` rule) and the held-out SFT loss (per-token mean over assistant tokens), with
transformers directly, so base, SFT and RL checkpoints are scored by the same code. The runs
themselves are ``python -m runtime.launch`` commands (BENCHMARKS.md lists them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buffers.types import Prompt, Sample  # noqa: E402
from launchers.rewards import gsm8k_reward  # noqa: E402
from policies.sft import assistant_mask  # noqa: E402

INSTRUCTION = " Solve it step by step and end with '#### <answer>'."


def write_data(out: Path, *, n_sft: int, n_rl: int, n_eval: int, task: str = "gsm_symbolic") -> None:
    import reasoning_gym as rg

    out.mkdir(parents=True, exist_ok=True)
    if task == "chain_sum":
        from launchers.recipes import chain_sum

        problems = list(rg.create_dataset("chain_sum", size=(n_sft + n_rl) * 2 + chain_sum.N_EVAL * 4, seed=1,
                                          **chain_sum.TASK))
        train, held = chain_sum.split(problems)  # held-out expressions never in training rows
        train, held = train[:n_sft + n_rl], held[:n_eval]

        def user(e: dict) -> str:
            return e["question"]

        def solution(e: dict) -> str:
            return f"{e['metadata']['expression']} = {e['answer']}"
    else:
        train = list(rg.create_dataset("gsm_symbolic", size=n_sft + n_rl, seed=1))
        held = list(rg.create_dataset("gsm_symbolic", size=n_eval, seed=2))

        def user(e: dict) -> str:
            return e["question"] + INSTRUCTION

        def solution(e: dict) -> str:
            cot = e["metadata"]["answer_cot"].strip()
            return cot if "####" in cot else f"{cot}\n#### {e['answer']}"

    def dump(name: str, rows: list[dict]) -> None:
        with open(out / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    dump("sft.jsonl", [{"messages": [{"role": "user", "content": user(e)},
                                     {"role": "assistant", "content": solution(e)}]} for e in train[:n_sft]])
    dump("rl.jsonl", [{"prompt": user(e), "label": e["answer"]} for e in train[n_sft:]])
    dump("eval_rl.jsonl", [{"prompt": user(e), "label": e["answer"]} for e in held])
    dump("eval_sft.jsonl", [{"messages": [{"role": "user", "content": user(e)},
                                          {"role": "assistant", "content": solution(e)}]} for e in held])

@torch.no_grad()
def evaluate(model_dir: str, data: Path, *, n: int, max_new_tokens: int, batch: int, generate: bool = True) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in open(data / "eval_rl.jsonl")][:n]
    t0 = time.monotonic()
    correct = 0
    for i in range(0, len(rows) if generate else 0, batch):
        chunk = rows[i:i + batch]
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                         add_generation_prompt=True) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            correct += gsm8k_reward_score(tok.decode(ids, skip_special_tokens=True), r["label"])
    gen_s = time.monotonic() - t0
    loss = heldout_loss(model, tok, data, n=n)
    return {"model": model_dir, "n": len(rows), "accuracy": correct / len(rows) if generate else None,
            "heldout_sft_loss": loss,
            "eval_s": round(gen_s, 1)}


def gsm8k_reward_score(text: str, label: str) -> float:
    """The run's own ``--rm-type gsm8k`` verifier on one answer."""
    return float(gsm8k_reward(Prompt(index=0, input_ids=[], label=label), Sample(0, 0, [], response_text=text)) > 0)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tok, data: Path, *, n: int) -> float:  # noqa: ANN001
    total, tokens = 0.0, 0
    for line in list(open(data / "eval_sft.jsonl"))[:n]:
        ids, mask = assistant_mask(tok, json.loads(line)["messages"])
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1).gather(-1, x[0, 1:, None])[:, 0]
        m = torch.tensor(mask[1:], dtype=torch.float)
        total += float(-(logp * m).sum())
        tokens += int(m.sum())
    return total / max(tokens, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--n-sft", type=int, default=400)
    d.add_argument("--n-rl", type=int, default=400)
    d.add_argument("--n-eval", type=int, default=64)
    d.add_argument("--task", choices=["gsm_symbolic", "chain_sum"], default="gsm_symbolic")
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--n", type=int, default=64)
    e.add_argument("--max-new-tokens", type=int, default=160)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--loss-only", action="store_true", help="held-out SFT loss only (no generation)")
    a = p.parse_args()
    if a.cmd == "data":
        write_data(a.out, n_sft=a.n_sft, n_rl=a.n_rl, n_eval=a.n_eval, task=a.task)
        return
    torch.set_num_threads(a.threads)
    print(json.dumps(evaluate(a.model, a.data, n=a.n, max_new_tokens=a.max_new_tokens, batch=a.batch,
                                generate=not a.loss_only)))


if __name__ == "__main__":
    main()
