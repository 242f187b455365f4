"""The query gateway: where a query enters the mesh on this peer.

The control socket's ``query`` and the HTTP API both come through :meth:`QueryGateway.generate`,
so both get this peer's ``[limits]`` and the same errors. The gateway waits a while for a plan
that is still loading, and coordinates the query (:class:`~meshllm.pipeline.coordinator.
Coordinator`): a query interrupted by a plan change goes on on the next plan once it is ready.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import structlog
import trio

from meshllm.config import Config
from meshllm.errors import BadRequest, Busy, NotReady, NotServing, TooLarge
from meshllm.mesh.node import MeshNode
from meshllm.model.manifest import Manifest
from meshllm.model.sampling import SamplingParams
from meshllm.model.tokenizer import ChatTokenizer, TextStream
from meshllm.pipeline.coordinator import Coordinator, OnToken, QueryFailed, QueryResult, Send
from meshllm.pipeline.leader import Leader
from meshllm.pipeline.plan import Plan
from meshllm.pipeline.serving_state import ServingState
from meshllm.pipeline.stage_requests import sampling_from
from meshllm.pipeline.stall import first_unready, why_stalled

log = structlog.get_logger("meshllm.serve")


class ReadyModel(NamedTuple):
    """The served model, ready to answer: its name and its tokenizer (chat template)."""

    name: str
    tokenizer: ChatTokenizer


class QueryGateway:
    # A query that comes while the plan loads (a stage still fetching its segment, or its
    # "ready" not yet heard here, right after `serve` returned elsewhere) waits this long
    # for it instead of failing at once.
    READY_WAIT_S = 30.0

    def __init__(
        self, config: Config, node: MeshNode, state: ServingState, leader: Leader, send: Send
    ):
        self.config = config
        self.node = node
        self.state = state
        self.leader = leader
        self.coordinator = Coordinator(
            node.peer_id,
            send,
            config.mesh.step_timeout_s,
            current_epoch=lambda: state.epoch,
            next_plan=self._next_plan,
            peer_alive=node.peer_alive if config.mesh.move_kv else None,
            why_stalled=lambda plan: why_stalled(plan, state.stage_view),
        )
        self.stopping = False  # the daemon is stopping: no new queries
        self._query_ended = trio.Event()

    async def drained(self) -> None:
        """Return once no query coordinated here is running."""
        while self.coordinator.in_flight:
            await self._query_ended.wait()

    # -- what is served -----------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """Every model imported on a live peer (served or not), by name."""
        return sorted(self.leader.imported())

    def served_model(self) -> str | None:
        """The model of the current plan, ready or not."""
        return self.state.plan.model if self.state.plan is not None else None

    def ready_model(self) -> ReadyModel:
        """The served model's name and tokenizer, once every stage of its plan is ready;
        else NotServing or NotReady, saying why not."""
        plan, _manifest, tok = self._ready_plan()
        return ReadyModel(plan.model, tok)

    async def ready_model_soon(self) -> ReadyModel:
        """:meth:`ready_model`, waiting up to :attr:`READY_WAIT_S` while the plan loads."""
        with trio.move_on_after(self.READY_WAIT_S):
            while True:
                try:
                    return self.ready_model()
                except NotReady:
                    pass
                await self.state.news(0.5)  # woken by every heartbeat
        return self.ready_model()

    def _ready_plan(self) -> tuple[Plan, Manifest, ChatTokenizer]:
        st = self.state
        plan, manifest, tok = st.plan, st.manifest, st.tokenizer
        if plan is None:
            raise NotServing("no model is served: run `meshllm serve MODEL`")
        if not st.plan_ready() or manifest is None or tok is None:
            why = self.leader.replan_failure(plan.epoch)
            if why is not None:
                raise NotServing(
                    f"the mesh cannot serve {plan.model} now: {why} (it resumes when peers return)"
                )
            why = first_unready(plan, st.stage_view) or "this peer is loading the tokenizer"
            raise NotReady(f"the mesh is still loading {plan.model} ({why}); try again")
        return plan, manifest, tok

    # -- queries ------------------------------------------------------------------------------
    async def op_query(self, args: dict[str, Any], emit) -> Any:  # type: ignore[no-untyped-def]
        prompt = args.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("query needs args.prompt (a non-empty string)")
        max_tokens = args.get("max_tokens", 128)
        sampling = sampling_from(args)
        model, tok = await self.ready_model_soon()
        t0 = time.perf_counter()
        prompt_ids = tok.encode_prompt(prompt, raw=bool(args.get("raw", False)))
        tokenize_s = time.perf_counter() - t0
        stream = TextStream(tok)

        async def on_token(token: int) -> None:
            delta = stream.push(token)
            await emit({"token": token, "text": delta})

        result = await self.generate(
            prompt_ids, max_tokens=max_tokens, sampling=sampling, on_token=on_token
        )
        out = result.to_dict()
        out["text"] = tok.decode(result.token_ids)
        out["model"] = model
        out["ttft_s"] = result.ttft_s + tokenize_s
        return out

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: Any,
        sampling: SamplingParams,
        on_token: OnToken | None = None,
    ) -> QueryResult:
        """Run one tokenized query on the mesh, coordinated here: the one path behind the
        control socket's ``query`` and the HTTP API, so both get this peer's ``[limits]``
        and the same errors (:class:`~meshllm.errors.Refused`: BadRequest, TooLarge, Busy,
        NotServing, NotReady, QueryFailed). *on_token* is as for :meth:`Coordinator.run_query`."""
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest("args.max_tokens must be a positive integer")
        limits = self.config.limits
        if max_tokens > limits.max_new_tokens:
            raise TooLarge(
                f"max_tokens {max_tokens} is over this peer's limit of {limits.max_new_tokens} "
                "([limits] max_new_tokens)"
            )
        if self.stopping:
            raise NotServing("this peer is stopping: ask another peer")
        if self.coordinator.in_flight >= limits.max_concurrent_requests:
            raise Busy(
                f"this peer is already coordinating {self.coordinator.in_flight} queries, its "
                "limit ([limits] max_concurrent_requests): try again, or ask another peer"
            )
        plan, manifest, _tok = self._ready_plan()
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise TooLarge(
                f"the prompt is {len(prompt_ids)} tokens; this peer accepts at most "
                f"{limits.max_prompt_tokens} ([limits] max_prompt_tokens)"
            )
        try:
            return await self.coordinator.run_query(
                plan,
                manifest.architecture,
                prompt_ids,
                max_tokens=max_tokens,
                sampling=sampling,
                on_token=on_token,
            )
        finally:
            self._query_ended.set()
            self._query_ended = trio.Event()

    async def _next_plan(self, after: int, reason: str) -> Plan:
        """For an interrupted query: the next plan once every stage of it is ready."""
        log.info("query_interrupted", epoch=after, reason=reason)
        timeout = self.config.mesh.recovery_timeout_s
        # A link can break with every peer alive (a stream reset under load). Once a dead
        # peer would have been noticed, a plan still current and ready is retried as is.
        mesh = self.config.mesh
        same_plan_after = trio.current_time() + mesh.dead_after_s + 2 * mesh.heartbeat_interval_s
        with trio.move_on_after(timeout):
            while True:
                plan = self.state.plan
                if plan is not None and self.state.plan_ready():
                    if plan.epoch > after:
                        return plan
                    if plan.epoch == after and trio.current_time() >= same_plan_after:
                        log.info("query_retry_same_plan", epoch=after)
                        return plan
                why = self.leader.replan_failure(after)
                if why is not None:
                    raise QueryFailed(f"{reason}; the mesh cannot go on: {why}")
                # Woken by every heartbeat: a stage's "ready" counts as soon as it is heard.
                await self.state.news(0.2)
        raise QueryFailed(f"{reason}; no new plan was ready within {timeout:g} s")
