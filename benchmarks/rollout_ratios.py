"""The rollout-speed report's ratios to plain generation, and the table it prints.

:func:`ratios` turns the best-of-rounds measurements of :mod:`benchmarks.rollout_speed` into
the ratios it reports (whole run, per round, pooled over the interleaved rounds, until the
queue empties); :func:`print_report` prints the table and those ratios.
"""
from __future__ import annotations


def ratios(r_a: dict, r_b: dict, r_c: dict | None, interleaved: list[bool], first: str) -> dict:
    """The report's ratio entries: (b) over (a) for every schedule (best of each, and within each
    round), over the rounds where (a) ran inside the ``first`` schedule's rollout, until the queue
    empties, and (c) over (a)."""
    by_schedule = {sch: round(r["tokens_per_s"] / r_a["tokens_per_s"], 3) for sch, r in r_b.items()}
    per_round = {sch: [round(n * ga / (r_a["tokens"] * gb), 3) for n, gb, ga in zip(r["round_tokens"], r["round_seconds"], r_a["round_seconds"])]
                 for sch, r in r_b.items()}  # the ratio within each round
    paired = [i for i, x in enumerate(interleaved) if x]  # rounds where (a) ran inside the first rollout
    pooled = None
    if paired:  # tokens/s over those rounds together, rollout against generate
        f = r_b[first]
        pooled = round(sum(f["round_tokens"][i] for i in paired) / sum(f["round_seconds"][i] for i in paired)
                       / (len(paired) * r_a["tokens"] / sum(r_a["round_seconds"][i] for i in paired)), 3)
    steady = {sch: [round(x * ga / r_a["tokens"], 3) for x, ga in zip(r["round_steady_tokens_per_s"], r_a["round_seconds"])]
              for sch, r in r_b.items() if r.get("round_steady_tokens_per_s")}  # until the queue empties, per round
    return {
        "ratio_rollout_over_generate": by_schedule[first],
        "ratios_rollout_over_generate": by_schedule,
        "ratios_by_round": per_round,
        "rounds_interleaved": interleaved,
        "ratio_interleaved_rounds": pooled,
        "steady_ratios_by_round": steady,
        "ratio_policy_over_generate": round(r_c["tokens_per_s"] / r_a["tokens_per_s"], 3) if r_c else None,
    }


def print_report(model: str, repeats: int, report: dict, schedules: list[str]) -> None:
    """The table of a rollout-speed report, and its ratios."""
    r_a, r_b, r_c = report["generate"], report["rollouts"], report["policy_generate"]
    by_schedule, per_round = report["ratios_rollout_over_generate"], report["ratios_by_round"]
    steady, pooled = report["steady_ratios_by_round"], report["ratio_interleaved_rounds"]
    paired = [i for i, x in enumerate(report["rounds_interleaved"]) if x]
    rows = [("(a) model.generate", r_a)] + [(f"(b) rollout {sch}", r) for sch, r in r_b.items()] + ([("(c) policy.generate", r_c)] if r_c else [])
    print(f"\nmodel={model} B={report['batch']} episodes={report['episodes']} T={report['T']} threads={report['torch_threads']} prompts "
          f"{min(report['prompt_tokens'])}-{max(report['prompt_tokens'])} tokens, "
          f"load avg {report['loadavg_before'][0]} -> {report['loadavg_after'][0]}")
    print(f"{'':32} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ratio':>6} {'prefill s':>9} {'packed s':>9} {'decode s':>9} {'steps':>6} {'ms/step':>8} {'ctx':>7}")
    for label, r in rows:
        print(f"{label:32} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.2f} {r['tokens_per_s'] / r_a['tokens_per_s']:>6.3f} "
              f"{r['prefill_seconds']:>9.2f} {r['packed_seconds']:>9.2f} {r['decode_seconds']:>9.2f} {r['decode_steps']:>6} {r['ms_per_decode_step']:>8.1f} {r['mean_decode_context']:>7.0f}")
    for sch, r in r_b.items():
        print(f"rollout {sch}: {r['decode_slots']} decode slots for {r['tokens']} agent tokens, prefill {r['prefill_tokens']} tokens "
              f"({r['prefill_padded_slots']} padded slots) in {r['prefill_calls']} calls, packed {r['packed_tokens']} tokens in "
              f"{r['packed_calls']} calls ({r['packed_batch_rows']} of them decode-batch rows), {r['observation_tokens']} observation tokens; "
              f"encode {r['encode_seconds']} s, env+other {r['env_and_other_seconds']} s, EM {r['em']:.3f}")
    for sch, r in r_b.items():
        if "drain_seconds" in r:
            print(f"rollout {sch}: until the queue empties {r['queue_empty_tokens']} tokens in {r['queue_empty_seconds']} s "
                  f"({r['steady_tokens_per_s']} tok/s, ratio per round {steady[sch]}), "
                  f"then the drain: {r['drain_tokens']} tokens in {r['drain_seconds']} s; longest episode {r['longest_episode_tokens']} tokens")
    if repeats > 1:
        print("ratio within each round: " + ", ".join(f"{sch} {per_round[sch]}" for sch in by_schedule)
              + (f"   (generate interleaved with {schedules[0]} in rounds {[i + 1 for i in paired]})" if paired else ""))
    if pooled is not None:
        print(f"ratio rollout/generate over the interleaved rounds together: {schedules[0]} {pooled:.3f}")
    print("ratio rollout/generate (best of each): " + ", ".join(f"{sch} {x:.3f}" for sch, x in by_schedule.items())
          + (f"   policy/generate = {report['ratio_policy_over_generate']:.3f}" if r_c else ""))
