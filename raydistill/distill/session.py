"""``ray_session``: start (or join) Ray for one job and always shut it down afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

from raydistill.config import ConfigError

log = logging.getLogger("raydistill")

# Quieter Ray: these must be set before Ray (and its controller / workers) start.
_QUIET_ENV = {
    "RAY_DEDUP_LOGS": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}
# The V2 controller polls workers every health-check interval (default 2 s) and a report() with a
# checkpoint waits for that poll: with ~1 s epochs the default would double the run time.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def train_env() -> None:
    """Env the Ray Train controller reads (propagated from the driver when ``fit()`` starts it)."""
    for k, v in TRAIN_ENV.items():
        os.environ.setdefault(k, v)


def quiet_ray_env() -> None:
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    train_env()
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\..*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, *, quiet: bool = True):
    """Start a local Ray instance sized to the machine (``num_cpus`` defaults to ``os.cpu_count()``), or
    join ``address`` / ``$RAY_ADDRESS``; shut it down on exit, including on Ctrl-C and errors.

    Without an address the instance is always a new one of our own (``ray.init(address="local")``), even
    when a ``ray start`` cluster runs on this machine or a dead one left its address file behind: joining
    one takes an explicit ``--address``. An address is probed before ``ray.init`` (which retries for
    minutes): when no Ray cluster answers there within ``RAYDISTILL_RAY_CONNECT_TIMEOUT_S`` (30 s) a
    :class:`RayAddressError` (a ``ConfigError``; rc 2 from the CLI) names it.

    If Ray is already initialised (e.g. inside a Tune trial or a test fixture) the session is reused and
    left running. Worker output is not forwarded to the driver (``log_to_driver=False``) and lives in the
    Ray session's log directory.

    A local instance is watched by ``raydistill.distill.watchdog``: if this process dies without shutting
    Ray down (SIGKILL), the watchdog kills the processes this Ray session started.

    A local instance keeps its dashboard on and has its State API pinned to it: Ray Train's
    placement-group cleaner (what frees the CPUs of a trial that Tune stopped, or of a controller killed
    on Ctrl-C) asks the State API whether the controller is alive, and the State API finds its cluster
    through ``RAY_API_SERVER_ADDRESS`` or, failing that, by scanning the machine; with a second Ray
    instance on the machine the scan fails ("Found multiple active Ray instances"), the cleaner dies and
    the placement group leaks (see Ray issue #54305). So the dashboard port is chosen first and
    ``RAY_API_SERVER_ADDRESS`` exported before ``ray.init``; the raylet and every worker inherit it.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    if quiet:
        quiet_ray_env()
    key = "--address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, key = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    address = address or None
    if address is not None:
        probe_address(address, key)
    kwargs: dict = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else logging.INFO}
    prev_api = os.environ.get("RAY_API_SERVER_ADDRESS")
    if address is None:
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs.update(num_cpus=int(num_cpus or os.cpu_count() or 1), include_dashboard=True, dashboard_port=port)
    elif num_cpus is not None:
        raise ValueError("num_cpus applies to a local Ray instance only, not when joining address=" + address)
    if quiet:
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    dog = None
    if address is None:
        from raydistill.distill import watchdog

        dog = watchdog.start()  # kills this Ray's processes if the driver dies without shutting it down
    try:
        _init_with_retry(ray, address or "local", kwargs)
    except BaseException:
        if dog is not None:
            dog.stop()
        raise
    if quiet:
        try:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
        except Exception:  # pragma: no cover - older/newer Ray Data
            pass
    try:
        yield ray
    finally:
        ray.shutdown()
        if dog is not None:
            dog.stop()
        if address is None:
            if prev_api is None:
                os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            else:
                os.environ["RAY_API_SERVER_ADDRESS"] = prev_api


class RayAddressError(ConfigError):
    """No Ray cluster answers at the address to join (``--address`` / ``RAY_ADDRESS``)."""


def connect_timeout_s() -> float:
    return float(os.environ.get("RAYDISTILL_RAY_CONNECT_TIMEOUT_S", "30"))


def probe_address(address: str, key: str = "--address", timeout_s: float | None = None) -> None:
    """Fail fast (within ``timeout_s``, default ``RAYDISTILL_RAY_CONNECT_TIMEOUT_S`` = 30 s) when no Ray
    cluster answers at ``address`` (``host:port`` of a head's GCS, or ``ray://host:port``): first a TCP
    connection, then, for a GCS address, one request to it. ``ray.init`` itself would retry for minutes.
    ``auto`` / ``local`` are left to Ray."""
    import socket
    import time

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayAddressError(f"{key} {address}: not a Ray address; use host:port of the head node (the "
                              "address `ray start --head` prints) or ray://host:port")
    host = host.strip("[]")
    timeout_s = connect_timeout_s() if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    hint = ("start one there with `ray start --head`, or leave out --address and RAY_ADDRESS to run on a "
            "local Ray instance of this machine")
    last = None
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                break
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            reason = (last.strerror or str(last)) if isinstance(last, OSError) else "no answer"
            raise RayAddressError(f"{key} {address}: no Ray cluster answered within {timeout_s:g} s "
                                  f"({reason}); {hint}")
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if "://" in address:
        return  # Ray Client: its server answered; ray.init's handshake reports anything else
    if not _gcs_answers(f"{host}:{port}", max(1.0, deadline - time.monotonic())):
        raise RayAddressError(f"{key} {address}: something accepts connections there but no Ray cluster "
                              f"answered within {timeout_s:g} s (is it the head's GCS port, 6379 by default, "
                              f"and not e.g. the dashboard's?); {hint}")


def _gcs_answers(address: str, timeout_s: float) -> bool:
    """One request to the GCS at ``address`` in a daemon thread; True when it is answered in time, even with
    an error (a cluster with token authentication refuses this unauthenticated probe, but it is a cluster:
    ``ray.init`` reports what follows). Ray's client retries for minutes when the port is not a GCS; the
    thread is then left behind (it holds no lock and ends with the process)."""
    import threading

    done = threading.Event()

    def ask():
        try:
            from ray._raylet import GcsClient

            GcsClient(address=address).internal_kv_get(b"raydistill-probe", namespace=None,
                                                       timeout=max(1, int(timeout_s)))
        except Exception:  # noqa: BLE001 - an answer, if an unfriendly one
            pass
        finally:
            done.set()

    threading.Thread(target=ask, name="raydistill-gcs-probe", daemon=True).start()
    return done.wait(timeout_s)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


def _init_with_retry(ray, address, kwargs, attempts: int = 3) -> None:
    """``ray.init``; a local start that times out (Ray waits a fixed 30 s for the raylet to register,
    which a heavily loaded machine can miss) is shut down and retried."""
    for i in range(attempts):
        try:
            ray.init(address=address, **kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            # a timed-out start, a dashboard that did not come up in time, or a dashboard port taken between
            # _free_port() and Ray's bind (other Ray instances start on this machine too): a local start is
            # shut down and retried on a fresh port
            if address != "local" or i == attempts - 1:
                raise
            log.warning("Ray start failed (attempt %d of %d, busy machine?): %s; retrying", i + 1, attempts,
                        str(exc).splitlines()[0][:200])
            ray.shutdown()
            if "dashboard_port" in kwargs:  # the timed-out attempt's dashboard may still hold its port
                port = _free_port()
                kwargs["dashboard_port"] = port
                os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
