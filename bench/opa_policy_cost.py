"""What a policy library costs OPA above OPA's own floor, side by side.

    python -m bench.opa_policy_cost [--policies DIR] [--inputs DIR] [--path vvault/authz/decision]
                                    [--decisions 1500] [--rounds 5] [--concurrency 4]

Two OPA servers with the settings deploy/ ships (GOGC=400, GOMEMLIMIT=200MiB): one with the
library (the repo's policies unless ``--policies``), one whose decision at ``--path`` is a
constant — what OPA's REST server costs per decision whatever the policy: reading the
request, decoding the input, the query, encoding the answer.  Both get the same decisions
(``POST /v1/data/<path>?provenance=true``, the inputs of ``--inputs``, keep-alive, as the PEP
asks) in interleaved rounds, and the CPU per decision of each process comes from /proc.  What
the library adds is the difference.  Then ``opa bench`` evaluates the library alone on each
input: its allocations per evaluation do not move with the machine's speed, so they are the
figure to compare two versions of a policy by.

Every input must get a result at ``--path`` from the library: an undefined decision costs
less than a real one and would say nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from bench.common import ROOT, free_port, opa_argv, opa_binary, wait_http
from bench.opa_gc import DECISION_PATH, INPUTS, Measured, Setup, example_bodies, side_by_side

DEPLOYED = {"GOGC": "400", "GOMEMLIMIT": "200MiB"}  # as deploy/ runs OPA
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FLOOR_VALUE = {
    "allow": False,
    "status": 403,
    "code": "policy.denied",
    "reason": "constant",
    "reasons": ["policy.denied"],
}


def floor_module(path: str) -> str:
    """A Rego module whose document at ``path`` ("a/b/rule") is a constant decision."""
    parts = path.strip("/").split("/")
    if len(parts) < 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise ValueError(f"--path {path!r}: want package segments and a rule name, such as vvault/authz/decision")
    value = orjson.dumps(FLOOR_VALUE).decode()
    return f"package {'.'.join(parts[:-1])}\n\n{parts[-1]} := {value}\n"


@dataclass(frozen=True)
class EvalCost:
    ns_per_op: int
    allocs_per_op: int
    bytes_per_op: int


def eval_cost(policies: Path, input_doc: bytes, path: str) -> EvalCost:
    """``opa bench``: the evaluation alone of ``data.<path>`` on one input (test files left out)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(input_doc)
        f.flush()
        argv = [opa_binary(), "bench", "-d", str(policies), "--ignore", "*_test.rego", "-i", f.name]
        argv += ["--format", "json", "data." + path.strip("/").replace("/", ".")]
        done = subprocess.run(argv, capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"opa bench failed: {done.stderr.decode(errors='replace').strip()}")
    result = orjson.loads(done.stdout)
    n = int(result["N"])
    return EvalCost(int(result["T"]) // n, int(result["MemAllocs"]) // n, int(result["MemBytes"]) // n)


async def require_results(policies: Path, bodies: list[bytes], path: str) -> None:
    """Every input gets a defined decision from the library (``opa eval`` would need a file per input)."""
    port = free_port()
    proc = subprocess.Popen(opa_argv(port, policies=policies), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_http(f"http://127.0.0.1:{port}/health")
        async with aiohttp.ClientSession() as http:
            for k, body in enumerate(bodies):
                async with http.post(f"http://127.0.0.1:{port}/v1/data/{path}", data=body) as resp:
                    answer = orjson.loads(await resp.read())
                if resp.status != 200 or "result" not in answer:
                    raise SystemExit(f"input {k + 1}: no decision at {path} from {policies} ({resp.status}: {answer})")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def compare(
    policies: Path, floor_dir: Path, bodies: list[bytes], args: argparse.Namespace
) -> dict[str, Measured]:
    await require_results(policies, bodies, args.path)
    setups = {"floor: a constant decision": Setup(DEPLOYED, floor_dir), "the library": Setup(DEPLOYED, policies)}
    return await side_by_side(
        setups, bodies, decisions=args.decisions, rounds=args.rounds, concurrency=args.concurrency, path=args.path
    )


def measure(args: argparse.Namespace) -> int:
    args.path = args.path.strip("/")
    try:
        module = floor_module(args.path)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    policies, inputs = Path(args.policies).resolve(), Path(args.inputs)
    files = sorted(inputs.glob("*.json"))
    bodies = example_bodies(inputs)
    with tempfile.TemporaryDirectory(prefix="opa-floor-") as floor_dir:
        (Path(floor_dir) / "floor.rego").write_text(module)
        results = asyncio.run(compare(policies, Path(floor_dir), bodies, args))
    floor, library = results.values()
    print(f"OPA CPU per decision at {args.path}, {args.rounds} interleaved rounds of {args.decisions} decisions")
    print(f"(GOGC=400 GOMEMLIMIT=200MiB; library: {policies}; inputs: {inputs})")
    print(f"{'':<30} {'ms per decision, each round':<36} {'median':>7} {'× floor':>8}")
    for name, m in results.items():
        rounds = " ".join(f"{v:.3f}" for v in m.per_round_ms)
        print(f"{name:<30} {rounds:<36} {m.median_ms:7.3f} {m.median_ms / floor.median_ms:8.2f}")
    added = library.median_ms - floor.median_ms
    print(f"the library adds {added:.3f} ms per decision: {added / library.median_ms:.0%} of OPA's CPU per decision")
    print("\nevaluation alone (opa bench), per input:")
    for file, body in zip(files, bodies, strict=True):
        cost = eval_cost(policies, orjson.dumps(orjson.loads(body)["input"]), args.path)
        print(
            f"  {file.name:<36} {cost.allocs_per_op:6d} allocs/op {cost.bytes_per_op / 1024:6.1f} KiB/op "
            f"{cost.ns_per_op / 1e6:7.3f} ms/op"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default=str(ROOT / "policies"), help="the library (a directory of Rego and data)")
    parser.add_argument("--inputs", default=str(INPUTS), help="a directory of policy inputs (*.json)")
    parser.add_argument("--path", default=DECISION_PATH, help="the decision's path under /v1/data")
    parser.add_argument("--decisions", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    return measure(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
