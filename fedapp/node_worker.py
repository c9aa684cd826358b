"""The ClientApp of a client node, long-lived, in its SuperNode's process.

Flower 1.42's SuperNode, in its default ``subprocess`` isolation, has its SuperExec
start a new ``flwr-clientapp`` process for every message: each one imports torch,
installs the app bundle and loads the data again (2-5 s a message, several messages a
round). In ``--isolation process`` the SuperNode starts nothing and waits for something
beside it to claim its tasks through its Runtime API. This module is that something,
run as a thread of the SuperNode's own process (:func:`serve_in_process`, started by
``python -m fedapp.polling``, which ``fedapp client`` runs): it claims the node's
ClientApp tasks one after the other (the calls SuperExec makes: ``AcquireTask``, then
the task's own token for ``PullTaskInput``, ``PullMessages``, ``PushMessages`` and
``PushTaskOutput``, done by Flower's own functions from
``flwr.supernode.runtime.run_clientapp``) and runs the ClientApp, one task at a time
(each task's transfers in a thread of its own). The ClientApp is loaded once per app
bundle, so the modules it imports and the data it caches (``clients.tasks._pool``) stay
loaded between messages.

Those calls go to :class:`InProcessRuntime`: the functions Flower's Runtime API routes
call, on the SuperNode's own state, with the same task-token check, but no HTTP. Over
HTTP (a worker process beside the SuperNode, as before) a message's objects, the
polls and their retries were each a request, and on a 2-core machine with 3 nodes
those requests took more CPU than the housing model's training (docs/deployment.md).

What changes for the app: nothing in the messages, the context or the node's state
(Flower keeps ``context.state`` in the SuperNode and hands it over with each task as
before); only module-level state now outlives a message, as it does in simulation.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.servicer.runtime import runtime_handlers as core_handlers
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)
from flwr.supernode.servicer.runtime import runtime_handlers as node_handlers

from fedapp.polling import Cadence

POLL_SECONDS = 0.02  # between looks for a task during a run (in memory, no request)
IDLE_POLL_SECONDS = 0.25  # ... and after a minute without one

# The task calls Flower's run_clientapp functions make, and the handler Flower's route
# for each calls (flwr.supercore.routers.runtime.router).
_TASK_CALLS: dict[str, Callable[[Any, Any, Task], Any]] = {
    "PullTaskInput": node_handlers.pull_task_input,
    "PullMessages": node_handlers.pull_messages,
    "PushMessages": node_handlers.push_messages,
    "PullObject": node_handlers.pull_object,
    "PushObject": node_handlers.push_object,
    "ConfirmMessageReceived": node_handlers.confirm_message_received,
    "PushTaskOutput": node_handlers.push_task_output,
    "SendTaskHeartbeat": core_handlers.send_task_heartbeat,
}


class InProcessRuntime:
    """The SuperNode's Runtime API for a caller in the SuperNode's process.

    Has the methods of Flower's ``RuntimeHttpClient`` that a ClientApp task uses
    (``PullTaskInput(request)``, ``PushObject(request)``, ...), each answered by the
    handler Flower's HTTP route calls, on the same state. A task call first finds the
    task by its token, as the route does, and fails as the route fails without one.

    Parameters
    ----------
    state : NodeState
        The SuperNode's state.
    token : str | None
        The claimed task's token; None for the node-wide ``AcquireTask``.
    """

    def __init__(self, state: Any, token: str | None = None) -> None:
        self.state = state
        self.token = token

    def AcquireTask(self, request: AcquireTaskRequest) -> Any:  # noqa: N802 - Flower's name
        return node_handlers.acquire_task(request, self.state)

    def __getattr__(self, name: str) -> Callable[[Any], Any]:
        handler = _TASK_CALLS.get(name)
        if handler is None:
            raise AttributeError(name)
        return lambda request: handler(request, self.state, self._task())

    def _task(self) -> Task:
        task = self.state.get_task_by_token(self.token) if self.token else None
        if task is None:
            raise FlowerError(ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED,
                              "Runtime task-token authentication failed.")
        return task

    def close(self) -> None:
        """Nothing to close (Flower's client closes its connection here)."""


def _task_heartbeat(client: InProcessRuntime) -> Callable[[], bool]:
    """The task's heartbeat. Flower's ``flwr-clientapp`` interrupts its own process when
    the SuperNode no longer knows the task; here that process is the SuperNode, so the
    task is only logged as lost (its reply will be refused)."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        if not client.SendTaskHeartbeat(request).success:
            log(logging.WARNING, "The SuperNode no longer knows this ClientApp task")
        return True

    return beat


class ClientAppWorker:
    """Claims and runs one SuperNode's ClientApp tasks, one at a time.

    Parameters
    ----------
    state : NodeState
        The SuperNode's state (its Runtime API is called in process, through
        :class:`InProcessRuntime`).
    """

    def __init__(self, state: Any) -> None:
        self.state = state
        self._apps: dict[str, ClientApp] = {}  # by app bundle hash
        self._load = get_load_client_app_fn(default_app_ref="", app_path=None,
                                            multi_app=True)
        self._control = InProcessRuntime(state)
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
        client = InProcessRuntime(self.state, token)
        heartbeat = HeartbeatSender(_task_heartbeat(client))
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


def serve_in_process(state: Any, poll_seconds: float = POLL_SECONDS) -> threading.Thread:
    """Run the node's ClientApp tasks in a daemon thread of this (the SuperNode's) process.

    Parameters
    ----------
    state : NodeState
        The SuperNode's state.
    poll_seconds : float
        Seconds between looks for a task during a run.
    """
    worker = ClientAppWorker(state)
    thread = threading.Thread(target=_serve_or_stop, args=(worker, poll_seconds),
                              daemon=True, name="fedapp-clientapp")
    thread.start()
    log(logging.INFO, "ClientApp worker running in the SuperNode's process")
    return thread


def _serve_or_stop(worker: ClientAppWorker, poll_seconds: float) -> None:
    """Serve; if serving itself fails, stop the SuperNode (SIGTERM, which Flower's
    SuperNode handles by leaving cleanly) rather than leave a node that takes tasks and
    never runs them. ``fedapp client`` then exits with the SuperNode's code."""
    try:
        worker.serve(poll_seconds)
    except Exception as exc:  # noqa: BLE001 - any failure stops the node
        log(logging.ERROR, "The ClientApp worker stopped (%s: %s); stopping the SuperNode",
            type(exc).__name__, exc)
        os.kill(os.getpid(), signal.SIGTERM)
