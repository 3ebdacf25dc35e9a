"""``ray_session``: start (or join) Ray for one job and always shut it down afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

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
    address = address or os.environ.get("RAY_ADDRESS") or None
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
        _init_with_retry(ray, address, kwargs)
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
            if address is not None or "timed out during startup" not in str(exc) or i == attempts - 1:
                raise
            log.warning("Ray start timed out (attempt %d of %d, busy machine?); retrying", i + 1, attempts)
            ray.shutdown()
            if "dashboard_port" in kwargs:  # the timed-out attempt's dashboard may still hold its port
                port = _free_port()
                kwargs["dashboard_port"] = port
                os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"


def ray_log_dir() -> str | None:
    """The current Ray session's log directory (workers' stdout/stderr), if Ray is running locally."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        node = getattr(ray, "_private", None) and ray._private.worker.global_worker.node
        if node is not None:
            return node.get_logs_dir_path()
        return getattr(ctx, "gcs_address", None)
    except Exception:
        return None
