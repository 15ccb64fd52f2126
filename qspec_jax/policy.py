"""Speculation policy (issue 12): choose `gamma` and the draft mode where speculation pays.

A QSpec cycle drafts `gamma` tokens (`gamma` draft steps) and verifies them in one W4A16 pass over
`gamma + 1` positions; it emits E[n] tokens on average. Against plain W4A16 decoding (one step per
token) the speedup is

    S(gamma, draft) = E[n] * t_plain / (gamma * t_draft + t_verify(gamma))

with E[n] = 1 + sum_{j=1..gamma} prod_{i<=j} a_i, a_i the acceptance rate at draft position i given
that every draft before it was accepted (one rate a for every position: (1 - a^(gamma+1)) / (1 - a)).
`choose` takes the argmax over gamma in 0..MAX_POLICY_GAMMA and the drafts; gamma 0 (plain W4A16,
S = 1) wins unless some setting predicts S > 1 + MARGIN.

Costs (`t_plain`, `t_draft`, `t_verify` per batch, and per context where a table has a context axis)
come from a JSON table per device kind and KV cache kind shipped with the package in
qspec_jax/cost_tables/ (`scripts/build_cost_table.py` builds it from the committed H200 measurements;
`find_table` reads it through importlib.resources, so an installed package finds it too); between measured
batches and contexts they are interpolated linearly, outside them clamped. The committed H200 table
holds one context (456) and batches 1 and 16, so every context gets the 456-token costs and every
batch above 16 gets batch 16's. Acceptance starts at a
prior per draft fitted to the real-model measurements (benchmarks/acceptance/acceptance.json) and
`AutoGamma.update` moves it toward the per-position rates a run observed (`GenerationResult.
accepted_at` / `gamma_cycles`). A device without a table (the CPU) gets DEFAULT_GAMMA / DEFAULT_DRAFT,
the best fixed setting measured on the real model, and the choice says so in `policy_source`.

The host choice (`choose`) fixes the draft and a gamma g* before compiling. Where g* > 0 and a cost
table priced it, the compiled loop then re-chooses gamma in 0..g* every cycle from the same costs and
the acceptance it has seen so far in this run (`AdaptiveGamma`, `pick_gamma`). A cycle drafts the
chosen g tokens (a loop of traced length) and verifies at the fixed width g* + 1, the padding past g
never accepted: XLA copies every buffer a branch of a conditional updates in place, so choosing the
verify width with a `lax.switch` would copy the whole KV cache each cycle. A smaller g therefore
saves draft steps, not verify work; the cost model prices cycles that way (g t_draft + t_verify(g*)).
When the choice falls to 0 the drafting loop ends and a plain-decoding loop finishes the run: a cycle
at gamma 0 drafts nothing and so teaches nothing, so speculation once off stays off for that run (the
next run starts again from `AutoGamma`'s updated counts). Its first cycle runs g* (same prior, costs
no higher than the host's). So the compiled program holds one draft forward, one verify forward and
one plain forward, and a draft that accepts less than its prior moves the loop to fewer drafts or
to plain decoding.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
from importlib import resources
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = "cost_tables"  # package data of qspec_jax: <device>[_int8kv]_costs.json
ACCEPTANCE_FILE = os.path.join(ROOT, "benchmarks", "acceptance", "acceptance.json")
DRAFTS = ("w4a8", "w4a4")
MAX_POLICY_GAMMA = 8  # the chooser's range; the CLI's integer --gamma goes up to generate.MAX_GAMMA
MARGIN = 0.02  # speculate only when the predicted speedup is above 1 + MARGIN
# No cost table (CPU, unmeasured GPUs): the best fixed setting measured on SmolLM2 (benchmarks/acceptance:
# w4a8 at gamma 3 accepted 0.99, 3.9 tokens per cycle, identical output to W4A16).
DEFAULT_GAMMA, DEFAULT_DRAFT = 3, "w4a8"
PRIOR_STRENGTH = 50.0  # pseudo-trials per position behind the prior rate
FALLBACK_RATES = {"w4a8": 0.98, "w4a4": 0.88}  # used only when acceptance.json is missing


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the policy chose and why (hashable: it rides on a GenerationResult as static data)."""

    gamma: int
    draft: Optional[str]  # None with gamma 0 (plain decoding in the verifier's mode)
    predicted_speedup: Optional[float]  # vs plain W4A16; None without a cost table
    policy_source: str  # the cost table used, or why the default was taken
    batch: int = 0
    context: int = 0
    adaptive: bool = False  # the loop re-chooses gamma in 0..gamma every cycle (`AdaptiveGamma`)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Expected tokens per cycle and speedup


def expected_tokens(rates: Sequence[float], gamma: int) -> float:
    """E[n] tokens per cycle at `gamma`: 1 + sum_{j<gamma} prod_{i<=j} rates[i] (rates per position,
    each conditional on the drafts before it being accepted; a scalar means one rate everywhere)."""
    if np.ndim(rates) == 0:
        rates = [float(rates)] * gamma
    if len(rates) < gamma:
        raise ValueError(f"{len(rates)} rates for gamma {gamma}")
    return 1.0 + float(np.sum(np.cumprod(np.asarray(rates[:gamma], np.float64)))) if gamma else 1.0


def expected_tokens_single(a: float, gamma: int) -> float:
    """E[n] with one rate: (1 - a^(gamma+1)) / (1 - a) (gamma + 1 at a = 1)."""
    return gamma + 1.0 if a == 1 else (1.0 - a ** (gamma + 1)) / (1.0 - a)


def speedup(rates, gamma: int, t_plain: float, t_draft: float, t_verify: float) -> float:
    """Predicted tokens per second of QSpec over plain W4A16 (1.0 at gamma 0 by definition)."""
    if gamma == 0:
        return 1.0
    return expected_tokens(rates, gamma) * t_plain / (gamma * t_draft + t_verify)


# ---------------------------------------------------------------------------------------------------
# Cost tables


class CostTable:
    """Step costs of one device kind and KV cache kind (ms), interpolated linearly in batch and in
    context, clamped outside the measured range of each.

    JSON layout, one context (what `build_cost_table` writes from one step file):
        {"device_kind", "kv" (optional, default "bf16"), "context": c, "batches": [b...],
         "plain_ms": [per batch], "draft_ms": {draft: [per batch]}, "verify_ms": [[gamma 0..G] per batch],
         "estimated": [...], "sources": {...}, "notes": [...]}
    The context is recorded but the costs do not depend on it: every context gets these costs.
    With a context axis (`build_cost_table` from step files at several contexts):
        {..., "contexts": [c...], "plain_ms": [[per batch] per context],
         "draft_ms": {draft: [[per batch] per context]}, "verify_ms": [[[gamma 0..G] per batch] per context]}
    Every context holds the same batches.
    """

    def __init__(self, table: dict, source: str = "table"):
        self.table, self.source = table, source
        self.device_kind = table["device_kind"]
        self.kv = table.get("kv", "bf16")
        self.batches = np.asarray(table["batches"], np.float64)
        axis = "contexts" in table
        # One context: a context axis of length 1 (its costs serve every context).
        self.contexts = np.asarray(table["contexts"] if axis else [table.get("context", 0)], np.float64)
        arr = lambda v: np.asarray(v, np.float64) if axis else np.asarray(v, np.float64)[None]  # noqa: E731
        self.plain = arr(table["plain_ms"])  # [contexts, batches]
        self.draft = {d: arr(v) for d, v in table["draft_ms"].items()}
        self.verify = arr(table["verify_ms"])  # [contexts, batches, gammas]
        nc, nb = len(self.contexts), len(self.batches)
        if (self.plain.shape != (nc, nb) or self.verify.ndim != 3 or self.verify.shape[:2] != (nc, nb)
                or any(v.shape != (nc, nb) for v in self.draft.values())):
            raise ValueError(f"cost table {source}: plain_ms {self.plain.shape} / verify_ms {self.verify.shape} do "
                             f"not match {nc} contexts x {nb} batches")
        if np.any(np.diff(self.contexts) <= 0) or np.any(np.diff(self.batches) <= 0):
            raise ValueError(f"cost table {source}: contexts and batches must increase")
        self.max_gamma = self.verify.shape[2] - 1

    @classmethod
    def load(cls, path: str) -> "CostTable":
        with open(path) as f:
            return cls(json.load(f), source=os.path.relpath(path, ROOT))

    def _at(self, values, batch, context):
        """values [contexts, batches] at (batch, context): linear in batch within each measured
        context, then linear in context; np.interp clamps outside either range."""
        per_context = [np.interp(batch, self.batches, row) for row in values]
        return float(np.interp(context or 0, self.contexts, per_context))

    def t_plain(self, batch: int, context: int = 0) -> float:
        return self._at(self.plain, batch, context)

    def t_draft(self, draft: str, batch: int, context: int = 0) -> float:
        return self._at(self.draft[draft], batch, context)

    def t_verify(self, gamma: int, batch: int, context: int = 0) -> float:
        if gamma > self.max_gamma:
            raise ValueError(f"the cost table covers gamma 0..{self.max_gamma}, not {gamma}")
        return self._at(self.verify[:, :, gamma], batch, context)


def _normalize(kind: str) -> str:
    return "".join(c for c in kind.lower() if c.isalnum())


def find_table(device_kind: str, table_dir: Optional[str] = None, kv: str = "bf16") -> Optional[CostTable]:
    """The cost table whose device_kind matches (case and punctuation ignored) and whose KV cache
    kind is `kv` (a table without a "kv" key is a bf16-KV table), or None. Searched: the tables
    shipped in the package (qspec_jax/cost_tables/, read as package data), or `table_dir`."""
    if table_dir is None:
        shipped = resources.files("qspec_jax").joinpath(TABLES)
        files = [(f"qspec_jax/{TABLES}/{f.name}", f.read_text) for f in (shipped.iterdir() if shipped.is_dir() else ())
                 if f.name.endswith("_costs.json")]
    else:
        files = [(os.path.relpath(path, ROOT), pathlib.Path(path).read_text)
                 for path in glob.glob(os.path.join(table_dir, "*_costs.json"))]
    for source, read in sorted(files, key=lambda f: f[0]):
        table = json.loads(read())
        if _normalize(table.get("device_kind", "")) == _normalize(device_kind) and table.get("kv", "bf16") == kv:
            return CostTable(table, source=source)
    return None


def current_device_kind() -> str:
    import jax

    dev = jax.devices()[0]
    return dev.device_kind if dev.platform != "cpu" else "cpu"


# ---------------------------------------------------------------------------------------------------
# Acceptance prior


def fit_rate(points: Sequence[tuple]) -> float:
    """The single per-position rate a whose E[n](gamma) best fits measured (gamma, tokens_per_cycle,
    weight) points (weighted least squares over a grid: robust and dependency-free)."""
    grid = np.linspace(0.0, 0.9999, 10000)
    err = np.zeros_like(grid)
    for g, tpc, w in points:
        e = (1 - grid ** (g + 1)) / (1 - grid)
        err += w * (e - tpc) ** 2
    return float(grid[int(np.argmin(err))])


def acceptance_prior(path: str = ACCEPTANCE_FILE) -> dict:
    """{draft: per-position rate} fitted to the real-model runs (tokens per cycle at each gamma)."""
    if not os.path.exists(path):
        return dict(FALLBACK_RATES)
    with open(path) as f:
        runs = json.load(f)["runs"]
    prior = {}
    for d in DRAFTS:
        pts = [(r["gamma"], r["all"]["tokens_per_cycle"], r["all"]["cycles"]) for r in runs if r["draft"] == d]
        prior[d] = fit_rate(pts) if pts else FALLBACK_RATES[d]
    return prior


def trace_prior(traces: dict) -> dict:
    """{draft: per-position rate} fitted to replay traces (`scripts/measure_acceptance.py`'s
    traces.json: {"traces": {"<draft>_g<gamma>": [rows][cycles] accepted counts, -1 inactive}}).
    Tokens per cycle here are accepted + 1 over every active cycle, not truncated at the token
    budget as acceptance.json's are, so the fit comes out slightly higher from the same run."""
    prior = {}
    for d in DRAFTS:
        pts = []
        for name, t in traces["traces"].items():
            draft, _, g = name.rpartition("_g")
            t = np.asarray(t)
            if draft == d and (t >= 0).any():
                pts.append((int(g), float(np.mean(t[t >= 0] + 1)), int(np.sum(t >= 0))))
        prior[d] = fit_rate(pts) if pts else FALLBACK_RATES[d]
    return prior


# ---------------------------------------------------------------------------------------------------
# The chooser


def choose(table: Optional[CostTable], rates: dict, batch: int, context: int = 0, *,
           drafts: Sequence[str] = DRAFTS, max_gamma: int = MAX_POLICY_GAMMA, margin: float = MARGIN,
           device_kind: str = "") -> Choice:
    """argmax over gamma 0..max_gamma and `drafts` of the predicted speedup; gamma 0 unless the best
    beats 1 + margin. `rates`: {draft: per-position rates (list) or one rate}. No table: the default."""
    if table is None:
        draft = DEFAULT_DRAFT if DEFAULT_DRAFT in drafts else drafts[0]
        return Choice(DEFAULT_GAMMA, draft, None, f"default (no cost table for device kind {device_kind!r})",
                      int(batch), int(context))
    max_gamma = min(max_gamma, table.max_gamma)
    best = (-1.0, 0, None)  # the best speculative setting, paying or not
    t_plain = table.t_plain(batch, context)
    for d in drafts:
        r = rates[d]
        r = [float(r)] * max_gamma if np.ndim(r) == 0 else list(r)
        for g in range(1, max_gamma + 1):
            s = speedup(r, g, t_plain, table.t_draft(d, batch, context), table.t_verify(g, batch, context))
            if s > best[0]:
                best = (s, g, d)
    s, g, d = best
    src = table.source
    if s <= 1.0 + margin:
        return Choice(0, None, 1.0, f"{src} (best speculative setting: gamma {g} {d}, predicted {s:.3f}x)",
                      int(batch), int(context))
    return Choice(g, d, round(s, 4), src, int(batch), int(context))


class AutoGamma:
    """Chooses (gamma, draft) per batch and learns acceptance from finished runs.

    Per draft and position j < MAX_POLICY_GAMMA it keeps accepted / reached counts on top of the prior
    (PRIOR_STRENGTH pseudo-trials at the prior rate). A position's rate is its own counts shrunk toward
    the draft's pooled observed rate, so positions a run never reached follow what earlier ones showed.
    """

    def __init__(self, table: Optional[CostTable] = None, prior: Optional[dict] = None, *,
                 device_kind: Optional[str] = None, drafts: Sequence[str] = DRAFTS,
                 max_gamma: int = MAX_POLICY_GAMMA, margin: float = MARGIN, strength: float = PRIOR_STRENGTH):
        self.table, self.drafts = table, tuple(drafts)
        self.device_kind = device_kind if device_kind is not None else (table.device_kind if table else "")
        self.max_gamma, self.margin, self.strength = max_gamma, margin, float(strength)
        self.prior = dict(prior) if prior is not None else acceptance_prior()
        self.accepted = {d: np.zeros(max_gamma) for d in self.drafts}
        self.reached = {d: np.zeros(max_gamma) for d in self.drafts}

    @classmethod
    def for_device(cls, device_kind: Optional[str] = None, kv: str = "bf16", **kw) -> "AutoGamma":
        """The policy for `device_kind` (default: the first JAX device's) and KV cache kind `kv`, with
        its table if one exists."""
        kind = current_device_kind() if device_kind is None else device_kind
        return cls(find_table(kind, kv=kv), device_kind=kind if kv == "bf16" else f"{kind}, {kv} KV cache", **kw)

    def rates(self, draft: str) -> list:
        """Current per-position acceptance estimates of `draft` (length max_gamma)."""
        k, a0 = self.strength, float(self.prior[draft])
        acc, reach = self.accepted[draft], self.reached[draft]
        pooled = (acc.sum() + k * a0) / (reach.sum() + k)
        return [float((acc[j] + k * pooled) / (reach[j] + k)) for j in range(self.max_gamma)]

    def choose(self, batch: int, context: int = 0, drafts: Optional[Sequence[str]] = None) -> tuple:
        """(gamma, draft) for a batch; `last_choice` keeps the full `Choice`."""
        c = self.choice(batch, context, drafts)
        return c.gamma, c.draft

    def choice(self, batch: int, context: int = 0, drafts: Optional[Sequence[str]] = None) -> Choice:
        drafts = tuple(drafts) if drafts else self.drafts
        rates = {d: self.rates(d) for d in drafts}
        self.last_choice = choose(self.table, rates, batch, context, drafts=drafts, max_gamma=self.max_gamma,
                                  margin=self.margin, device_kind=self.device_kind)
        return self.last_choice

    def adaptive(self, choice: Choice) -> Optional["AdaptiveGamma"]:
        """The in-loop policy behind `choice`: cycle times at gamma 0..choice.gamma (every drafting
        cycle verifies at the choice's width) and the draft's current per-position rates as the prior.
        None where the loop should keep the choice fixed: no cost table, or gamma 0 (a loop at gamma 0
        would never learn that drafting pays)."""
        if self.table is None or choice.gamma == 0:
            return None
        t, d, b, c, top = self.table, choice.draft, choice.batch, choice.context, choice.gamma
        verify = t.t_verify(top, b, c)
        cycle_ms = [t.t_plain(b, c)] + [g * t.t_draft(d, b, c) + verify for g in range(1, top + 1)]
        return AdaptiveGamma(tuple(cycle_ms), tuple(self.rates(d)[:top]), self.strength, self.margin)

    def update(self, result, draft: Optional[str] = None) -> None:
        """Add a finished run's per-position counts to `draft`'s (default: the draft the result's
        policy choice names). Runs without drafts (gamma 0) teach nothing."""
        choice = getattr(result, "policy", None)
        draft = draft or (choice.draft if choice is not None else None)
        if draft is None:
            return
        at = np.sum(np.asarray(result.accepted_at), axis=0).astype(np.float64)  # [gamma]
        # Cycles that reached position j: drafted it and accepted every draft before it.
        reached = np.sum(np.asarray(result.reached_at), axis=0).astype(np.float64)  # [gamma]
        n = min(at.size, self.max_gamma)
        self.accepted[draft][:n] += at[:n]
        self.reached[draft][:n] += reached[:n]


# ---------------------------------------------------------------------------------------------------
# Switching gamma inside the compiled loop


@dataclasses.dataclass(frozen=True)
class AdaptiveGamma:
    """What the compiled loop needs to re-choose its gamma every cycle (hashable host data; `arrays()`
    is what enters the program).

    cycle_ms[g]: predicted time of one cycle at gamma g = 0..G (the plain step at 0; g draft steps and
    the width-(G + 1) verify pass above it); prior[j]: acceptance rate of draft position j < G, worth
    `strength` pseudo-trials; margin: drafting must beat plain decoding by 1 + margin, as in `choose`.
    """

    cycle_ms: tuple
    prior: tuple
    strength: float = PRIOR_STRENGTH
    margin: float = MARGIN

    def __post_init__(self):
        if len(self.cycle_ms) < 2 or min(self.cycle_ms) <= 0:
            raise ValueError(f"need positive cycle times for gamma 0..G (G >= 1), got {self.cycle_ms}")
        if len(self.prior) != len(self.cycle_ms) - 1 or not all(0 <= r <= 1 for r in self.prior):
            raise ValueError(f"need {len(self.cycle_ms) - 1} prior rates in [0, 1], got {self.prior}")

    @property
    def max_gamma(self) -> int:
        return len(self.prior)

    def arrays(self) -> dict:
        """The traced half: {cycle_ms [G + 1], prior [G], strength, margin} as float32."""
        return {"cycle_ms": jnp.asarray(self.cycle_ms, jnp.float32), "prior": jnp.asarray(self.prior, jnp.float32),
                "strength": jnp.float32(self.strength), "margin": jnp.float32(self.margin)}


def pick_gamma(adaptive: dict, accepted_at, reached_at):
    """Inside the loop: the gamma in 0..G with the best predicted tokens per millisecond, given the
    batch's counts so far (accepted_at / reached_at: [B, G] per-row cycles that accepted / reached each
    draft position). Rate j = (accepted_j + strength * prior_j) / (reached_j + strength); E[n](g) =
    1 + sum_{j<g} prod_{i<=j} rate_i; score = E[n] / cycle_ms, plain decoding's raised by 1 + margin.
    Traced arrays in (`AdaptiveGamma.arrays()`), an int32 scalar out."""
    k = adaptive["strength"]
    rates = (jnp.sum(accepted_at, 0) + k * adaptive["prior"]) / (jnp.sum(reached_at, 0) + k)
    tokens = jnp.concatenate([jnp.ones((1,), jnp.float32), 1.0 + jnp.cumsum(jnp.cumprod(rates))])  # E[n], g = 0..G
    score = (tokens / adaptive["cycle_ms"]).at[0].multiply(1.0 + adaptive["margin"])
    return jnp.argmax(score).astype(jnp.int32)


def resolve(auto: Optional[AutoGamma], batch: int, context: int, draft_mode: Optional[str] = None,
            kv: str = "bf16") -> Choice:
    """The choice for one request: `auto` (default: the policy of the current device and KV cache
    kind `kv`), restricted to `draft_mode` when the caller fixed one."""
    auto = auto if auto is not None else AutoGamma.for_device(kv=kv)
    return auto.choice(batch, context, drafts=(draft_mode,) if draft_mode else None)
