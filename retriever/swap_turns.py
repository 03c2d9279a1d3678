"""Turns at hot swaps for the replicas of one index root: one replica swaps at a time, out of rotation.

Every replica watches the same CURRENT, so without turns they all load a new version at once. At 10M
articles under the 4 Gi pod limit a swap refuses 4-12% of a pod's requests for up to a minute
(docs/scale.md, hot swaps), in every replica together. With turns (`--swap-turns-redis-url`, a Redis all
replicas share), a replica that sees a new version:

1. takes the swap lease in Redis, or waits for it (polling CURRENT as before). The holder renews it
   while it swaps; one that dies holding it loses it after `lease_s`;
2. if another replica is serving (a heartbeat in Redis at most `stale_s` old), leaves rotation: `/ready`
   answers 503, so Kubernetes takes the pod out of the Service's endpoints, and it waits `drain_s` for
   that before it loads. Requests that still reach it are served as before;
3. loads and swaps; out of rotation, it also reads the new version's memory-mapped files into the page cache
   (retriever/index_slot.py, `Catalog.prefetch`), then rejoins rotation and hands the lease on. At 10M
   under 4 Gi (docs/scale.md, `--hot-swap turn`): out 18 s, then 0 of 3,000 refused in its first 30 s back.
   A turn longer than `--swap-turn-max-s` (a load stuck on its volume) rejoins rotation on the old version and
   hands the lease on: the roll-out goes on without it. Its load, if it ends, is kept and installed in a later
   turn (out of rotation again where another replica serves), never in place.

With no other replica serving it swaps in place, while serving, as a single pod must. Redis unreachable:
the swap goes ahead in place (a swap never waits on Redis), and the log says so.
One turn per process (its id is the host name and its pid): with KServe's `--workers N` each worker takes its
own, and a probe reaches any of them, so run one worker per pod (the manifests do) where turns matter.
A version refused only because Triton does not serve its towers yet is loaded in a turn and kept; asking
Triton again takes no turn, and once Triton serves them the replica takes a turn to install it.
A heartbeat says "in rotation and answering": a replica sends it only while its towers answered a health check
(its readiness probe's) within `heartbeat_stale_s`; one whose towers fail, or that no probe reaches, stops
counting as serving, so the others swap in place instead of leaving rotation for it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, Callable, Protocol

log = logging.getLogger("retriever.index")

# Lua, so that a replica never extends or deletes a lease another replica has taken since its own lapsed.
IF_HELD = "if redis.call('get', KEYS[1]) == ARGV[1] then return {} end return 0"
RENEW_IF_HELD = IF_HELD.format("redis.call('pexpire', KEYS[1], ARGV[2])")
RELEASE_IF_HELD = IF_HELD.format("redis.call('del', KEYS[1])")
REDIS_TIMEOUT_S = 1.0  # per call, from the index watcher's thread: never on a request's path


class Turn:
    """This replica's turn to swap; `drain`: leave rotation before loading (another replica serves)."""

    def __init__(self, drain: bool = False, release: Callable[[], None] | None = None):
        self.drain = drain
        self._release = release

    def __enter__(self) -> "Turn":
        return self

    def hand_on(self) -> None:
        """Let the next replica take its turn now (once: again at the end does nothing)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __exit__(self, *exc: object) -> None:
        self.hand_on()


class SwapTurns(Protocol):
    def take(self) -> Turn | None:
        """This replica's turn, or None while another replica holds it (ask again at the next poll)."""
        ...

    def heartbeat(self) -> None:
        """Say this replica is serving (called at every poll while it is in rotation)."""
        ...

    def leave(self) -> None:
        """No longer count this replica as serving (out of rotation, or stopping)."""
        ...


class SoloTurns:
    """No replicas to coordinate with: every swap at once, in place."""

    def take(self) -> Turn | None:
        return Turn()

    def heartbeat(self) -> None:
        pass

    def leave(self) -> None:
        pass


class RedisSwapTurns:
    """One swap lease and the serving replicas' heartbeats, in a Redis the replicas share.

    Keys (this class is their only reader and writer), `scope` naming the index root:
        twotower:swap-lease:<scope>  string, the holder's replica id, expiring after lease_s
        twotower:serving:<scope>     sorted set, replica id -> Redis server time of its last heartbeat
    """

    def __init__(self, url: str, scope: str, lease_s: float, stale_s: float, timeout_s: float, replica: str = ""):
        self.url = url
        self.lease_key = f"twotower:swap-lease:{scope}"
        self.serving_key = f"twotower:serving:{scope}"
        self.lease_ms = max(1, int(lease_s * 1000))
        self.stale_s = stale_s
        self.timeout_s = timeout_s
        self._replica = replica  # "": this process's own id, made where it runs (KServe workers unpickle this)
        self._client: Any = None  # redis.Redis, made on first use (a KServe worker unpickles this first)
        self._waiting_for = ""  # the holder last logged as swapping, so a wait is logged once
        self._failing = False  # Redis failures are logged once per outage

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def replica(self) -> str:
        return self._replica or f"{socket.gethostname()}:{os.getpid()}"

    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # no retries (redis-py retries a failed call by default): a dead Redis costs one timeout per call
            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        return self._client

    def _failed(self, doing: str, err: Exception) -> None:
        if not self._failing:
            log.warning("swap turns: Redis at %s failed %s (%s: %s)", self.url, doing, type(err).__name__, err)
        self._failing = True

    def _now(self, client: Any) -> float:
        seconds, micros = client.time()  # the server's clock: replicas' clocks may differ
        return seconds + micros / 1e6

    def take(self) -> Turn | None:
        import redis

        taken = False
        try:
            client = self._redis()
            taken = bool(client.set(self.lease_key, self.replica, nx=True, px=self.lease_ms))
            if not taken:
                holder = (client.get(self.lease_key) or b"").decode()
                if holder != self.replica:
                    if holder and holder != self._waiting_for:
                        log.info("index swap waits: replica %s is swapping", holder)
                    self._waiting_for = holder
                    return None  # an empty holder: the lease just lapsed, take it at the next poll
            self._waiting_for = ""
            now = self._now(client)
            others = [
                member
                for member in client.zrangebyscore(self.serving_key, now - self.stale_s, "+inf")
                if member.decode() != self.replica
            ]
            self._failing = False
        except (redis.RedisError, OSError) as err:
            self._failed("taking the swap turn; swapping in place", err)
            if taken:  # not held past this call: nothing renews it
                self._release_quietly()
            return Turn()
        renewer = threading.Event()
        threading.Thread(target=self._renew, args=(renewer,), name="swap-lease", daemon=True).start()

        def release() -> None:
            renewer.set()
            self._release_quietly()

        log.info("index swap turn taken; %d other replica(s) serving", len(others))
        return Turn(drain=bool(others), release=release)

    def _release_quietly(self) -> None:
        import redis

        try:
            self._redis().eval(RELEASE_IF_HELD, 1, self.lease_key, self.replica)
        except (redis.RedisError, OSError) as err:  # it lapses after lease_s
            self._failed("handing the swap lease on", err)

    def _renew(self, done: threading.Event) -> None:
        import redis

        while not done.wait(self.lease_ms / 3000):
            try:
                if not self._redis().eval(RENEW_IF_HELD, 1, self.lease_key, self.replica, self.lease_ms):
                    # lapsed (a Redis restart, or an outage longer than the lease): another replica may swap now
                    log.warning("swap lease lost while swapping: another replica may swap at the same time")
                    return
            except (redis.RedisError, OSError) as err:
                self._failed("renewing the swap lease", err)

    def heartbeat(self) -> None:
        import redis

        try:
            client = self._redis()
            now = self._now(client)
            client.zadd(self.serving_key, {self.replica: now})
            client.zremrangebyscore(self.serving_key, "-inf", now - self.stale_s)
            self._failing = False
        except (redis.RedisError, OSError) as err:
            self._failed("recording this replica's heartbeat", err)

    def leave(self) -> None:
        import redis

        try:
            self._redis().zrem(self.serving_key, self.replica)
        except (redis.RedisError, OSError) as err:
            self._failed("removing this replica's heartbeat", err)


def heartbeat_stale_s(poll_s: float) -> float:
    """How old a heartbeat (or the health check behind it) may be: five polls, at least 10 s. A replica that
    stopped, or stopped answering, is no longer counted on to serve after that."""
    return max(5 * poll_s, 10.0)


def swap_turns(url: str, scope: str, lease_s: float, poll_s: float) -> SwapTurns:
    """Turns through the Redis at `url`, or none ("": every replica swaps at once)."""
    if not url:
        return SoloTurns()
    return RedisSwapTurns(url, scope, lease_s, stale_s=heartbeat_stale_s(poll_s), timeout_s=REDIS_TIMEOUT_S)
