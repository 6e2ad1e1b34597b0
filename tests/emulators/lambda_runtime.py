#!/usr/bin/env python3
"""A local Lambda Runtime API: runs a `provided.al2023` function binary the way Lambda does.

It starts the function process (its `bootstrap`) with the variables the Lambda service sets,
serves the Runtime API it polls (`/2018-06-01/runtime/invocation/next`, `.../response`,
`.../error`, `/runtime/init/error`), and takes invocations over HTTP:

  POST /invoke   synchronous: the event in, {"ok": bool, "result"|"error", "duration_ms"} out
  POST /events   asynchronous, as EventBridge invokes: 202 at once; a failed invocation is retried
                 twice, as Lambda retries async events (after --retry-delays, default 0.5 s and
                 1 s; Lambda waits about 1 and 2 minutes)
  POST /queue    as EventBridge sends to an SQS queue that an event source mapping reads: 202
                 at once; the event becomes a message, and the mapping hands the function
                 batches of up to --batch-size messages as an SQS event, once a batch is full or
                 its first message has waited --batch-window seconds, at most --concurrency
                 batches at once. Messages the response names in `batchItemFailures` (all of
                 them when the invocation fails) are delivered again after
                 --visibility-timeout; after --max-receive receives they go to the dead-letter
                 list. The rest are deleted.
  GET  /queue    {"sent", "deleted", "receives", "in_queue", "dead": [bodies]}
  GET  /invocations   every invocation: event, outcome, duration, attempt
  GET  /init          {"init_ms": time from spawn to the first /next, "exited": code or null}

Usage: lambda_runtime.py --port PORT [--timeout SECONDS] [--concurrency N]
                         [--retry-delays S1,S2] [--batch-size N] [--batch-window S]
                         [--visibility-timeout S] [--max-receive N] -- BOOTSTRAP [ARGS...]

--concurrency N runs N copies of the function (execution environments), as a reserved
concurrency of N does: at most N invocations at once, the rest wait in the queue.
Measured times are wall clock on this machine (the handler's own time, between handing the event
out on /next and receiving its response).
"""
import argparse
import json
import os
import queue
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
PENDING = queue.Queue()
INVOCATIONS = []  # records
WAITERS = {}  # request id -> threading.Event
STATE = {"spawned": None, "first_next": None, "process": None, "init_error": None}
ARGS = None


def enqueue(event, sync, attempt=1, on_done=None, source=None):
    rid = str(uuid.uuid4())
    if on_done:
        DONE_HOOKS[rid] = on_done
    record = {
        "id": rid,
        "event": event,
        "sync": sync,
        "attempt": attempt,
        "source": source,
        "queued": time.time(),
        "started": None,
        "duration_ms": None,
        "ok": None,
        "result": None,
        "error": None,
    }
    done = threading.Event()
    with LOCK:
        INVOCATIONS.append(record)
        WAITERS[rid] = done
    PENDING.put(record)
    return record, done


class Queue:
    """An SQS queue and the event source mapping that reads it."""

    def __init__(self):
        self.cond = threading.Condition()
        self.messages = []  # {"id", "body", "visible_at", "receives", "sent"}
        self.in_flight = 0  # batches being handled
        self.stats = {"sent": 0, "deleted": 0, "receives": 0}
        self.dead = []

    def send(self, event):
        with self.cond:
            self.messages.append({"id": str(uuid.uuid4()), "body": json.dumps(event),
                                  "visible_at": time.time(), "receives": 0, "taken": False})
            self.stats["sent"] += 1
            self.cond.notify_all()

    def status(self):
        with self.cond:
            return dict(self.stats, in_queue=len(self.messages),
                        dead=[m["body"] for m in self.dead])

    def take(self):
        """The next batch, when one is due (full, or its first message waited the window)."""
        now = time.time()
        visible = [m for m in self.messages if not m["taken"] and m["visible_at"] <= now]
        if not visible or self.in_flight >= ARGS.concurrency:
            return None
        oldest = min(m["visible_at"] for m in visible)
        if len(visible) < ARGS.batch_size and now - oldest < ARGS.batch_window:
            return None
        batch = visible[:ARGS.batch_size]
        for m in batch:
            m["taken"] = True
            m["receives"] += 1
            self.stats["receives"] += 1
        self.in_flight += 1
        return batch

    def poll(self):
        while True:
            with self.cond:
                batch = self.take()
                while batch is None:
                    self.cond.wait(0.05)
                    batch = self.take()
            event = {"Records": [{
                "messageId": m["id"], "receiptHandle": m["id"], "body": m["body"],
                "attributes": {"ApproximateReceiveCount": str(m["receives"])},
                "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:lifeboat-lifecycle",
                "awsRegion": "us-east-1"} for m in batch]}
            enqueue(event, True, on_done=lambda r, batch=batch: self.done(r, batch), source="sqs")

    def done(self, record, batch):
        failed = {m["id"] for m in batch}
        if record["ok"]:
            items = (record["result"] or {}).get("batchItemFailures") or []
            failed = {i.get("itemIdentifier") for i in items}
        with self.cond:
            self.in_flight -= 1
            for m in batch:
                m["taken"] = False
                if m["id"] not in failed:
                    self.messages.remove(m)
                    self.stats["deleted"] += 1
                elif m["receives"] >= ARGS.max_receive:
                    self.messages.remove(m)
                    self.dead.append(m)
                else:
                    m["visible_at"] = record["started"] + ARGS.visibility_timeout
            self.cond.notify_all()


QUEUE = Queue()
DONE_HOOKS = {}  # request id -> callable(record), for the mapping's invocations


def finished(record):
    hook = DONE_HOOKS.pop(record["id"], None)
    if hook:
        hook(record)
    if record["sync"] or record["ok"] or record["attempt"] >= 3:
        return
    delay = ARGS.retry_delays[min(record["attempt"], len(ARGS.retry_delays)) - 1]

    def retry():
        time.sleep(delay)
        enqueue(record["event"], False, record["attempt"] + 1)

    threading.Thread(target=retry, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=None):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n)

    def do_GET(self):
        if self.path == "/2018-06-01/runtime/invocation/next":
            with LOCK:
                if STATE["first_next"] is None:
                    STATE["first_next"] = time.time()
            record = PENDING.get()
            record["started"] = time.time()
            deadline_ms = int((record["started"] + ARGS.timeout) * 1000)
            return self.reply(
                200,
                json.dumps(record["event"]),
                {
                    "Lambda-Runtime-Aws-Request-Id": record["id"],
                    "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                    "Lambda-Runtime-Invoked-Function-Arn": "arn:aws:lambda:us-east-1:123456789012:function:lifeboat",
                    "Lambda-Runtime-Trace-Id": "Root=1-00000000-000000000000000000000000",
                },
            )
        if self.path == "/queue":
            return self.reply(200, json.dumps(QUEUE.status()))
        if self.path == "/invocations":
            with LOCK:
                return self.reply(200, json.dumps(INVOCATIONS))
        if self.path == "/init":
            with LOCK:
                init = None
                if STATE["first_next"] is not None:
                    init = (STATE["first_next"] - STATE["spawned"]) * 1000
                p = STATE["process"]
                return self.reply(
                    200,
                    json.dumps(
                        {
                            "init_ms": init,
                            "exited": p.poll() if p else None,
                            "init_error": STATE["init_error"],
                        }
                    ),
                )
        self.reply(404, "{}")

    def do_POST(self):
        body = self.body()
        prefix = "/2018-06-01/runtime/invocation/"
        if self.path.startswith(prefix):
            rid, _, kind = self.path[len(prefix):].partition("/")
            with LOCK:
                record = next((r for r in INVOCATIONS if r["id"] == rid), None)
                done = WAITERS.pop(rid, None)
            if record is None or done is None:
                return self.reply(400, '{"errorType":"InvalidRequestID"}')
            record["duration_ms"] = (time.time() - record["started"]) * 1000
            payload = json.loads(body or b"null")
            record["ok"] = kind == "response"
            record["result" if record["ok"] else "error"] = payload
            done.set()
            finished(record)
            return self.reply(202, '{"status":"OK"}')
        if self.path == "/2018-06-01/runtime/init/error":
            with LOCK:
                STATE["init_error"] = json.loads(body or b"null")
            return self.reply(202, '{"status":"OK"}')
        if self.path == "/queue":
            QUEUE.send(json.loads(body or b"null"))
            return self.reply(202, "{}")
        if self.path in ("/invoke", "/events"):
            event = json.loads(body or b"null")
            record, done = enqueue(event, self.path == "/invoke")
            if self.path == "/events":
                return self.reply(202, json.dumps({"id": record["id"]}))
            done.wait(ARGS.timeout + 5)
            return self.reply(200, json.dumps(record))
        self.reply(404, "{}")


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--retry-delays", default="0.5,1",
                   type=lambda v: [float(x) for x in v.split(",")])
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--batch-window", type=float, default=1.0)
    p.add_argument("--visibility-timeout", type=float, default=5.0)
    p.add_argument("--max-receive", type=int, default=3)
    p.add_argument("command", nargs="+")
    ARGS = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Thread(target=QUEUE.poll, daemon=True).start()
    env = dict(os.environ)
    env.update(
        {
            "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{ARGS.port}",
            "AWS_LAMBDA_FUNCTION_NAME": "lifeboat",
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "128",
            "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/lifeboat",
            "AWS_LAMBDA_LOG_STREAM_NAME": "local",
            "LAMBDA_TASK_ROOT": os.path.dirname(os.path.abspath(ARGS.command[0])),
        }
    )
    STATE["spawned"] = time.time()
    STATE["process"] = subprocess.Popen(ARGS.command, env=env)
    others = [subprocess.Popen(ARGS.command, env=env) for _ in range(ARGS.concurrency - 1)]
    code = STATE["process"].wait()
    for other in others:
        other.kill()
    print(f"function exited with {code}", flush=True)
    # Keep answering /init so a test can read why the function stopped.
    threading.Event().wait()


if __name__ == "__main__":
    main()
