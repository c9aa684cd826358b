"""A long-lived ClientApp process for a client node.

Flower 1.42's SuperNode, in its default ``subprocess`` isolation, has its SuperExec
start a new ``flwr-clientapp`` process for every message: each one imports torch,
installs the app bundle and loads the data again (2-5 s a message, several messages a
round). In ``--isolation process`` the SuperNode starts nothing and waits for a
process beside it to claim its tasks through its Runtime API. This module is that
process: it claims the node's ClientApp tasks one after the other (the calls
SuperExec makes: ``AcquireTask``, then the task's own token for ``PullTaskInput``,
``PullMessages``, ``PushMessages`` and ``PushTaskOutput``, done by Flower's own
functions from ``flwr.supernode.runtime.run_clientapp``) and runs the ClientApp in
this process, one task at a time (each task's transfers in a thread of its own). The ClientApp is loaded once per app bundle, so the modules it imports
and the data it caches (``clients.tasks._pool``) stay loaded between messages.

What changes for the app: nothing in the messages, the context or the node's state
(Flower keeps ``context.state`` in the SuperNode and hands it over with each task as
before); only module-level state now outlives a message, as it does in simulation.

``fedapp client`` starts this beside ``flower-supernode --isolation process``:

    python -m fedapp.node_worker --runtime-api-address 127.0.0.1:9094 --parent-pid PID
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import threading

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from fedapp.polling import Cadence, fast_object_pulls

POLL_SECONDS = 0.1  # between AcquireTask calls during a run
IDLE_POLL_SECONDS = 0.5  # ... and after a minute without a task


def _runtime_client(address: str, component: str, token: str | None = None
                    ) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API, which listens on this machine only
    (plain HTTP on loopback, as SuperExec uses it in Flower's default mode)."""
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


class ClientAppWorker:
    """Claims and runs one SuperNode's ClientApp tasks, one at a time.

    Parameters
    ----------
    runtime_api_address : str
        ``HOST:PORT`` of the SuperNode's Runtime API (``flower-supernode --port``).
    """

    def __init__(self, runtime_api_address: str) -> None:
        self.address = runtime_api_address
        self._apps: dict[str, ClientApp] = {}  # by app bundle hash
        self._load = get_load_client_app_fn(default_app_ref="", app_path=None,
                                            multi_app=True)
        self._control = _runtime_client(runtime_api_address, "SuperExec")
        self._one_app_at_a_time = threading.Lock()

    def next_token(self) -> str | None:
        """Claim the node's next ClientApp task; its token, or None if there is none."""
        res = self._control.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP]))
        return res.token if res.HasField("task") and res.token else None

    def app_for(self, run, fab) -> ClientApp:  # noqa: ANN001 - Flower's Run and Fab
        """The run's ClientApp, installed and loaded on first use."""
        app = self._apps.get(fab.hash_str)
        if app is None:
            install_from_fab(fab.content, skip_prompt=True)
            app = self._load(run.fab_id, run.fab_version, fab.hash_str)
            self._apps[fab.hash_str] = app
        return app

    def run_task(self, token: str) -> bool:
        """Run one claimed task as ``flwr-clientapp`` would; True if it completed.

        A ClientApp that raises is answered with Flower's error message, as
        ``flwr-clientapp`` answers it, and the worker goes on with the next task.
        """
        client = _runtime_client(self.address, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            identity = (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id)
            with self._one_app_at_a_time:
                TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = identity
                reply = self.app_for(run, fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - reported to the server as flwr-clientapp does
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                details = "An exception was raised when attempting to load `ClientApp`"
            log(logging.ERROR, "ClientApp raised an exception", exc_info=ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001 - the task fails; the worker goes on
                log(logging.ERROR, "Failed to push the reply", exc_info=ex)
                status = SubStatus.FAILED
            push_task_output(client=client, context=context, sub_status=status,
                             details=details)
            heartbeat.stop()
            client.close()
        return status == SubStatus.COMPLETED

    def serve(self, poll_seconds: float = POLL_SECONDS) -> None:
        """Run the node's tasks as they come, until the process is stopped.

        Each task gets a thread; their ClientApp calls take turns. A task whose input
        never arrives (the SuperNode lists a message of a run that stopped before it
        had downloaded its objects) waits in its own thread, as it would in its own
        ``flwr-clientapp`` process, instead of holding up the tasks after it.
        """
        cadence = Cadence(poll_seconds, IDLE_POLL_SECONDS)
        while True:
            token = self.next_token()
            if token is None:
                cadence.sleep()
            else:
                cadence.busy()
                threading.Thread(target=self.run_task, args=(token,), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's "
                   "Runtime API, HOST:PORT")
    p.add_argument("--parent-pid", type=int, help="exit when this process exits")
    p.add_argument("--poll-seconds", type=float, default=POLL_SECONDS)
    args = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: where it is
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    fast_object_pulls()
    log(logging.INFO, "ClientApp worker for the SuperNode at %s", args.runtime_api_address)
    ClientAppWorker(args.runtime_api_address).serve(args.poll_seconds)


if __name__ == "__main__":
    main()
