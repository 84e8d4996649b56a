"""`overnight demo`: the whole loop on embedded defaults, night after night, with nothing to set up.

Everything lives under `.overnight/demo/` (its own SQLite store, local MLflow store, snapshots,
adapters, the base model, the suites, the server log), so it never touches a user's configured
store; each run starts from a clean store and reuses only the cached base model. It builds the
competent demo base model (`pipeline.demo_world.base_model`, about 10 minutes the first time),
writes the suites that test its skills, starts a local vLLM CPU server on it, and then, night
after night: generates that day's synthetic traffic for two tracks (with PII, duplicates, heavy
users and malformed lines), ingests it, lets simulated users chat with the served support track
through the gateway and rate the replies (`pipeline.demo_world.users`: their thumbs-up rate is the
support track's figure per night), and runs the real nightly flow (harvest, judge, select,
train, gate, register, deploy, commit); a deploy loads the new version into vLLM and flips the
track's route in the gateway started in front of it, as `overnight serve` does. After the last night
it asks each track's stable name a question through the gateway, and the math track (and the base)
every sum of the arithmetic suite; the gateway logs those exchanges into the demo's store, as it
would a user's traffic for the next night.

The `math` track asks the arithmetic the base learned only partly (it forgets carries) and is
rewarded by a verifiable exact-answer grader; its gain must be confirmed by the arithmetic suite,
and the support, JSON and refusal suites guard what the base already knows. The `support` track
learns from its users: they prefer the right steps in a short reply, which the base gives greedily
but only about half of its sampled replies do. Each night a reward model is fitted to the day's
thumbs and ratings, those of the nights before too (its held-out agreement with the users decides
whether it is used), and SFT learns from the replies users liked and from the best of the champion's
own samples ranked by that reward model (rejection sampling); the gate
samples replies, scores them with the reward model, and wants the gain confirmed by the
concise-support suite (the users' preference, graded by rule). The users' thumbs-up rate,
measured every day before the night and once after the last, is the support track's figure.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

import storage
from evals.suites import write_suite
from pipeline.config import OvernightConfig, load_config
from pipeline.demo_world import skills, users
from pipeline.demo_world import synthetic_traffic as synthetic_traffic
from pipeline.deploy.gateway.server import GatewayServer
from pipeline.deploy.vllm_client import VllmClient
from pipeline.deploy.vllm_process import ServerSpec, free_port
from storage.models import Interaction
from storage.routes import read_routes

DEMO_HOME = Path(".overnight/demo")
MALFORMED_EVERY = 50  # one malformed line per this many records, as real logs have
# LLM-judged items per track per night. Neither track is rewarded by the judge (the 3M-parameter
# base cannot judge), so the judge stage only scores a sample of rows: its agreement with the users'
# ratings is still measured (calibration), which is how a deployment would notice a judge it must not
# train on (measured: 64 items of 256 tokens cost about 3 of a night's 4 minutes, hence the cap).
JUDGE_STAGE_ITEMS = 24
JUDGE_MAX_TOKENS = 96
JUDGE_BUDGET = 400
# What survives between demo runs (caches); everything else starts clean.
TEACHER_DIR = "teacher-model"
KEEP = ("base-model", TEACHER_DIR)
MATH_NOTES = {
    "grpo": "math: rewarded by the exact answer",
    "distill": "math: distilled on-policy from the demo's teacher (a larger model grown from the base and "
    "trained on to full arithmetic competence)",
}
NOTE = (
    "{math}; its held-out accuracy must rise and be confirmed by the arithmetic suite, with no "
    "regression on support, JSON and refusals. support: learns from its simulated users' thumbs (SFT on "
    "its own best samples, ranked by a reward model fitted to their thumbs); its gain on sampled replies "
    "must be confirmed by the concise-support suite (the users' preference)"
)
SUITES = ("demo-arithmetic", "demo-support", "demo-concise-support", "demo-json", "demo-refusals")
SUITE_FILES = {name: f"suites/{name}.jsonl" for name in SUITES}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# GRPO steps per night on the math track at most (16 prompts x 8 samples a step, about 1.5 s on 2
# cores). Measured on the base outside the demo (200 unseen sums, greedy, three chained nights at
# learning rate 1e-3): 12 steps of 16 prompts went 92 -> 124 -> 154 -> 145 right, 12 steps of 8
# 92 -> 123 -> 142 -> 138 (in the demo 127 after three nights: +17.5 points, short of +20); 30 steps
# take the whole gain in one night (92 -> 152 -> 146), leaving nothing for the next; 2e-3 collapses it.
MATH_STEPS = 12
# Simulated users who chat with the served support track every day, through the gateway, and rate
# the replies by their hidden preference (`pipeline.demo_world.users`): their thumbs-up rate is the
# support track's figure per night, and their exchanges and feedback are the next night's data.
USERS_PER_NIGHT = 256
# SFT steps per night on the support track at most (8 replies a step, 3 passes over the night's best
# replies); the champion's samples per training prompt, of which the reward model keeps the best; and
# the gate's sampled replies per held-out prompt and suite case. Measured on one night of the base's
# replies (`bench/methods.py`): SFT on the best of 8 samples took the held-out users' thumbs-up rate
# from 0.378 to 0.663, KTO on the same data to 0.239.
SUPPORT_STEPS = 30
SUPPORT_SAMPLES = 8
GATE_SAMPLES = 4
USERS_FLUSH_SECONDS = 30.0  # the gateway stores an exchange within `gateway.flush_seconds`; this is a bound
QUESTIONS = {
    "support": "How do I reset my password?",
    "math": "What is 12 + 30?",
}


def demo_settings(port: int, gateway_port: int = 8080, *, distill: bool = False) -> dict[str, Any]:
    """The demo's overnight.yaml as data: two tracks sized for a tiny model on two CPU cores.

    `distill`: the math track learns by on-policy distillation from the demo's teacher (a larger
    model grown from the base and trained on to full arithmetic competence, `./teacher-model`)
    instead of GRPO on the exact answer,
    which stays its gate's reward.

    Paths are relative to the file, which lives in the demo's home: `overnight -c
    .overnight/demo/overnight.yaml status` works from any directory, and the home can be moved.
    """
    train = {
        "learning_rate": 1e-3,
        "temperature": 1.0,
        "beta": 0.0,
        "kl_budget": 5.0,
        "max_completion_tokens": 24,
        "num_generations": 4,
        "prompts_per_step": 4,
        "heldout_fraction": 0.4,
        "max_wall_seconds": 240,
        "lora": {"rank": 8, "alpha": 16, "target_modules": LORA_TARGETS},
    }
    # Greedy replies; a 60-case suite resolves about 0.05 (one case of 60 is 0.017, and its interval
    # reaches -0.05), so that is the margin: one flipped case passes, two do not.
    gate = {"temperature": 0.0, "max_new_tokens": 32, "max_kl_to_base": 20.0, "tolerance": 0.05}
    return {
        "home": ".",
        "database": {"url": "sqlite:///overnight.db"},
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "artifact_location": "mlartifacts"},
        "serving": {
            "base_model": "./base-model",  # "./": a local directory even before it is built
            "endpoints": [f"http://127.0.0.1:{port}"],
            "port": port,
            "dtype": "float32",
        },
        "gateway": {"port": gateway_port, "spool_dir": "gateway-spool"},
        # A night's users rate about 50 replies of its training prompts: a reward model needs many
        # passes over so few (measured on 60 rated base replies: 3 epochs agreed with held-out
        # thumbs 67%, Spearman 0.58, below the 70% it needs; 48 epochs 78%, Spearman 0.71, in 24 s).
        "reward_model": {"epochs": 50.0, "max_steps": 200},
        "judge": {
            "budget_items": JUDGE_BUDGET,
            "stage_items": JUDGE_STAGE_ITEMS,
            "max_tokens": JUDGE_MAX_TOKENS,
        },
        "train": train,
        "gate": gate,
        "tracks": [
            {
                "name": "support",
                "description": "Nimbus Notes support, learning from its users' thumbs (SFT on the best-rated).",
                # Only the exchanges of the app the users chat in, which the gateway logs with the
                # request's metadata: the day's users and their feedback are the night's data.
                "filter": {"metadata": {"app": users.APP}},
                "rubric": "concision",
                # The users' thumbs, through a reward model fitted to them every night (and the
                # nights before), rank the champion's own samples for SFT and score the gate's
                # held-out replies.
                "reward": {"judge": 0.0, "reward_model": 1.0},
                "suites": [
                    SUITE_FILES[name] for name in ("demo-support", "demo-concise-support", "demo-refusals")
                ],
                "harvest": {"max_chars": 2500},
                "train": {
                    "method": "sft",
                    "max_steps": SUPPORT_STEPS,
                    "epochs": 3,
                    "max_prompts": 128,
                    "heldout_fraction": 0.4,
                    "prompts_per_step": 8,
                    "num_generations": SUPPORT_SAMPLES,
                    "max_completion_tokens": users.REPLY_TOKENS,
                },
                # The gain is in sampled replies (greedy ones are already right and short), so the
                # gate samples too, `GATE_SAMPLES` replies per prompt, and the concise-support suite
                # (the users' preference, graded by rule, not by the judge) must confirm it.
                "gate": {
                    "temperature": 1.0,
                    "samples": GATE_SAMPLES,
                    "max_new_tokens": users.REPLY_TOKENS,
                    "confirm_with": ["demo-concise-support"],
                    "memory_cap": 0,
                    # Paraphrases of one question share one right answer: identical replies to
                    # different prompts are what support should do, not a degenerate candidate;
                    # and most of the champion's variety is the padding its users dislike (measured:
                    # a candidate that drops it has 0.49x to 0.61x the base's distinct 3-grams while
                    # the support and concise-support suites rise). A collapsed candidate still
                    # fails the support suite, which wants each question's own steps.
                    "max_identical_share": 1.0,
                    "min_distinct_ratio": 0.3,
                },
            },
            {
                "name": "math",
                "description": "Arithmetic (A + B, A - B), rewarded by the exact answer.",
                "rubric": "correctness",
                "suites": [SUITE_FILES[name] for name in SUITES],
                "reward": {"judge": 0.0, "graders": [{"type": "arithmetic", "weight": 1.0}]},
                "harvest": {"max_chars": 2500, "max_rows_per_user": 100},
                "train": {
                    "max_steps": MATH_STEPS,
                    "max_prompts": 240,
                    # More held out than trained on: a night's gain of about +0.08 needs some 150
                    # held-out prompts for its 95% interval to clear 0 (measured: +0.083 [-0.010,
                    # +0.167] on 96). The 12 steps of 16 take each of the ~110 training prompts about
                    # twice (`epochs`).
                    "heldout_fraction": 0.55,
                    "epochs": 2,
                    "max_completion_tokens": 16,
                    "prompts_per_step": 16,
                    "num_generations": 8,
                    **({"method": "distill", "teacher": {"path": f"./{TEACHER_DIR}"}} if distill else {}),
                },
                # The held-out gain must show on the arithmetic suite too (not only on the reward).
                # Confirmed at 70% rather than the default 80%: a night's honest gain moves the
                # 200-case suite by about +0.05, which its 80% interval does not separate from zero
                # (measured: +0.045 [+0.000, +0.090]); a hack moves it by -0.3 (planted tests).
                "gate": {
                    "confirm_with": ["demo-arithmetic"],
                    "confirm_confidence": 0.7,
                    "max_new_tokens": 16,
                },
            },
        ],
    }


def prepare_home(
    home: Path, port: int, gateway_port: int = 8080, *, distill: bool = False
) -> tuple[Path, OvernightConfig]:
    """A clean demo home (the cached base model kept) with its suites and overnight.yaml; returns
    (path, config)."""
    home.mkdir(parents=True, exist_ok=True)
    for entry in home.iterdir():
        if entry.name in KEEP:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for suite in skills.demo_suites():
        write_suite(suite, home / SUITE_FILES[suite.name])
    path = home / "overnight.yaml"
    header = "# Written by `overnight demo`; rewritten on every demo run.\n"
    settings = demo_settings(port, gateway_port, distill=distill)
    path.write_text(header + yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    return path, load_config(path, environ={})


def run_demo(
    nights: int,
    rows_per_night: int,
    *,
    users_per_night: int | None = None,
    distill: bool = False,
    home: Path = DEMO_HOME,
    on_stage: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run `nights` nights of the loop, `users_per_night` simulated users a day, the math track by
    distillation from the demo's teacher when `distill`; returns the JSON summary (one entry per night)."""
    from flows.nightly import nightly
    from pipeline.demo_world.base_model import build_base_model, build_teacher_model, read_stamp
    from pipeline.deploy.serving import start_serving
    from pipeline.services import gateway_app

    users_per_night = users_per_night or USERS_PER_NIGHT
    port = free_port()
    config_path, config = prepare_home(home, port, free_port(), distill=distill)
    on_stage("building the demo base model (about 10 minutes the first time, then cached)")
    model_dir = build_base_model(config.serving.base_model, on_progress=on_stage)
    if distill:
        on_stage("building the demo's teacher (about 2 minutes the first time, then cached)")
        build_teacher_model(home / TEACHER_DIR, model_dir, on_progress=on_stage)
    base_skills = (read_stamp(model_dir) or {}).get("skills", {})
    engine = storage.make_engine(config.database.url)
    storage.upgrade(engine)
    on_stage("starting the local vLLM server (about a minute on CPU)")
    spec = ServerSpec(
        model=str(model_dir),
        served_name=config.serving.base_name,
        port=port,
        dtype=config.serving.dtype,
        max_model_len=config.serving.max_model_len,
        max_loras=config.serving.max_loras,
        max_lora_rank=config.serving.max_lora_rank,
        log_file=home / "vllm.log",
    )
    server = start_serving(spec, [], timeout_seconds=config.serving.startup_timeout_seconds)
    front = None
    try:
        front = GatewayServer(gateway_app(config, engine), config.gateway.host, config.gateway.port).start()
        done = []
        for night in range(1, nights + 1):
            day = synthetic_traffic.DEFAULT_START + timedelta(days=night - 1)
            ingest = _ingest_night(engine, config, night, rows_per_night, day, on_stage)
            on_stage(f"night {night}: {users_per_night} simulated users chat with the support track")
            day_users = _users_chat(engine, front.base_url, night, users_per_night)
            on_stage(f"night {night}: nightly flow (harvest, judge, select, train, gate, register, deploy)")
            result = nightly(config_path=str(config_path), night=day.date().isoformat())
            done.append(
                {
                    "night": night,
                    "label": result["night"],
                    "ingest": ingest,
                    "users": day_users,
                    "tracks": result["tracks"],
                }
            )
        # What the users think of the champion the last night served: each night's figure is
        # measured before that night's update, so this closes the curve.
        on_stage(f"after night {nights}: {users_per_night} simulated users chat with the support track")
        users_after = _users_chat(engine, front.base_url, nights + 1, users_per_night)
        on_stage("asking each track's stable name through the gateway")
        logged_before = _count_interactions(engine)
        answers = _ask_tracks(config, front.base_url, engine)
        front.stop()  # flushes the gateway's log of those exchanges into the store
        captured = _count_interactions(engine) - logged_before
    finally:
        try:  # a second Ctrl-C while the gateway drains must still stop vLLM (its own session)
            if front is not None:
                front.stop()
        finally:
            server.stop()
            engine.dispose()
    return {
        "home": str(home),
        "config": str(config_path),
        "base_model": str(model_dir),
        "base_skills": base_skills,
        "note": NOTE.format(math=MATH_NOTES["distill" if distill else "grpo"]),
        "nights": done,
        "users_after": users_after,
        "answers": answers,
        "gateway": {"url": f"http://{config.gateway.host}:{config.gateway.port}/v1", "captured": captured},
        "browse": {
            "mlflow": f"mlflow ui --backend-store-uri {config.mlflow.tracking_uri}",
            "prefect": "prefect server start  (then run the demo again with PREFECT_API_URL set to see its flow runs)",
            "status": f"overnight -c {config_path} status",
        },
    }


def _ingest_night(
    engine: Any, config: OvernightConfig, night: int, rows: int, day: Any, on_stage: Callable[[str], None]
) -> dict[str, Any]:
    traffic = Path(config.home) / "traffic" / f"night-{night}.jsonl"
    traffic.parent.mkdir(parents=True, exist_ok=True)
    on_stage(f"night {night}: generating and ingesting {rows} interactions")
    records = synthetic_traffic.generate_records(
        rows, seed=night, start=day, math_problems=_math_question, math_system_prompt_rate=0.0
    )
    synthetic_traffic.write_jsonl(traffic, records, malformed_every=MALFORMED_EVERY, seed=night)
    return storage.ingest_jsonl(engine, traffic, batch_size=config.database.batch_size).as_json()


def _math_question(rng: random.Random) -> tuple[str, str, int]:
    """A math question the base was taught but never saw (held out from pretraining and the suite)."""
    problem = skills.math_problem(rng)
    return (
        problem.question(rng.randrange(len(skills.ARITHMETIC_FORMS))),
        f"{problem.a} {problem.op} {problem.b}",
        problem.result,
    )


def _users_chat(engine: Any, gateway_url: str, night: int, count: int) -> dict[str, Any]:
    """The day's simulated users ask the support track through the gateway and rate the replies
    (`pipeline.demo_world.users`); returns their report once the gateway has stored every exchange,
    so tonight's harvest takes them with their feedback."""
    before = _count_interactions(engine)
    report = users.chat_with_users(gateway_url, "support", count, seed=night)
    deadline = time.monotonic() + USERS_FLUSH_SECONDS
    while _count_interactions(engine) < before + report.asked and time.monotonic() < deadline:
        time.sleep(0.1)
    return report.as_json()


def _count_interactions(engine: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(Interaction)).scalar_one())


def _ask_tracks(config: OvernightConfig, gateway_url: str, engine: Any) -> list[dict[str, Any]]:
    """One greedy request to every track's stable name through the gateway (a track without a route
    yet: the base), which answers with the version the route points at and logs the exchange.

    The math track is also asked every question of the arithmetic suite (unseen sums), through its
    stable name and through the base: `right` and `base_right` say how many each answered exactly,
    so one lucky or unlucky example answer is not the whole story."""
    answers = []
    suite = next(suite for suite in skills.demo_suites() if suite.name == "demo-arithmetic")
    questions = [list(case.messages) for case in suite.cases]
    routes = read_routes(engine)
    base = config.serving.base_name
    with VllmClient(gateway_url) as client:
        for track in config.tracks:
            route = routes.get(track.name)
            name = track.name if route is not None else base
            question = QUESTIONS.get(track.name, "Hello!")
            reply = client.chat(name, [{"role": "user", "content": question}], max_tokens=24)
            answer: dict[str, Any] = {
                "track": track.name,
                "served_by": name,
                "version": route.adapter_name if route is not None else base,
                "question": question,
                "answer": reply,
            }
            if track.name == "math":
                answer["asked"] = len(questions)
                for key, model in (("right", name), ("base_right", base)):
                    replies = client.chat_many(model, questions, max_tokens=16)
                    answer[key] = int(
                        sum(case.score(r) for case, r in zip(suite.cases, replies, strict=True))
                    )
            answers.append(answer)
    return answers
