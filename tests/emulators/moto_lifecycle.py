#!/usr/bin/env python3
"""moto's server, extended with Auto Scaling lifecycle actions, still a real server on loopback.

moto terminates an instance at once on scale-in and answers CompleteLifecycleAction and
RecordLifecycleActionHeartbeat with HTTP 500. This wrapper patches its Auto Scaling backend:

- scale-in (SetDesiredCapacity / UpdateAutoScalingGroup) of a group with a terminate hook puts
  the chosen instances in Terminating:Wait with one action (and token) per terminate hook;
- RecordLifecycleActionHeartbeat and CompleteLifecycleAction work by token or by instance id, and
  answer ValidationError for a wrong hook, group, token, result, or an instance not waiting
  ("No active Lifecycle Action found ...", as AWS does);
- an action whose heartbeat timeout passes takes the hook's DefaultResult (result "timeout");
- with --imds-url, an instance entering Terminating:Wait gets target-lifecycle-state Terminated in
  the IMDS emulator (tests/emulators/imds.py) when its instance id is the emulator's.

A control server on --control-port answers GET /actions with every action and every call made
on it, with times, so tests can read what was called and when; POST /reset forgets them.
POST /faults injects trouble, scoped so parallel tests do not disturb each other:
  {"group": G, "throttle": {"RecordLifecycleActionHeartbeat": N, "CompleteLifecycleAction": N}}
      answer the next N calls of each operation on group G with Throttling ("Rate exceeded");
  {"bucket": B, "s3_part_delay_ms": D}   hold every UploadPart into bucket B for D ms.
GET /throttled lists the throttled calls.
A launch hook (EC2_INSTANCE_LAUNCHING) holds the instances a scale-out adds in Pending:Wait
until their actions end (CONTINUE: InService; ABANDON or a timeout's ABANDON: terminated).
POST /events {"group": G, "url": U} plays EventBridge for group G: each instance entering
Terminating:Wait is announced to U as an `EC2 Instance-terminate Lifecycle Action` event, each
entering Pending:Wait as an `EC2 Instance-launch Lifecycle Action` event.

It also carries the SSM agent stand-in (tests/emulators/ssm_agent.py), controlled under /ssm/.

Fleet limits (tests/tools/fleet_sim.py), each a token bucket (RATE per second, BURST deep; 0 turns
it off), answering as AWS does when empty: --as-rate/--as-burst for every Auto Scaling call
(Describe*, heartbeats, completions and the scale-in itself share it, as they share the
account's bucket), --send-rate and --list-rate for SSM SendCommand and ListCommands
(ThrottlingException), --sns-rate for SNS Publish (Throttling), --s3-put-rate for PutObject and
UploadPart per key prefix (the key up to the instance segment; 503 SlowDown). GET /fleet answers
the calls and throttles by operation. A scale-in never removes an instance that waits on a hook
(AWS drops the desired capacity when termination starts; moto would reconcile with the waiting
instances counted out).

Usage: moto_lifecycle.py --port PORT --control-port PORT [--imds-url URL] [fleet limits]
"""
import argparse
import json
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto.autoscaling import models as asm
from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import EmptyResult

import ssm_agent

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
LOCK = threading.RLock()
ACTIONS = []  # dicts, see start_wait
IMDS_URL = None
FAULTS = {"throttle": {}, "s3_delay": {}}
EVENT_TARGETS = {}  # group -> URL receiving lifecycle events


class Throttling(ValidationError):
    code = "Throttling"

    def __init__(self):
        super().__init__("Rate exceeded")


def now():
    return time.time()


def terminate_hooks(group, transition=TERMINATING):
    backend = group.autoscaling_backend
    return [
        h
        for h in backend.lifecycle_hooks.values()
        if h.auto_scaling_group_name == group.name and h.lifecycle_transition == transition
    ]


def new_action(group, state, hook, transition):
    timeout = int(hook.heartbeat_timeout or 3600)
    return {
        "token": str(uuid.uuid4()),
        "transition": transition,
        "instance_id": state.instance.id,
        "group": group.name,
        "hook": hook.name,
        "heartbeat_timeout": timeout,
        "default_result": hook.default_result or "ABANDON",
        "started": now(),
        "deadline": now() + timeout,
        "global_deadline": now() + min(172800, 100 * timeout),
        "result": None,
        "ended_by": None,
        "ended": None,
        "calls": [],
        "_state": state,
        "_group": group,
    }


def start_launch_wait(group, state, hooks):
    """A launch hook holds a new instance in Pending:Wait until its action ends (CONTINUE: it goes
    in service; ABANDON or the timeout's ABANDON: it is terminated)."""
    state.lifecycle_state = "Pending:Wait"
    with LOCK:
        ACTIONS.extend(new_action(group, state, hook, LAUNCHING) for hook in hooks)
        target = EVENT_TARGETS.get(group.name)
        events = [lifecycle_event(a) for a in ACTIONS[-len(hooks):]] if target else []
    for event in events:
        threading.Thread(target=ssm_agent.post_to, args=(target, event), daemon=True).start()


def start_wait(group, state, hooks):
    state.lifecycle_state = "Terminating:Wait"
    with LOCK:
        ACTIONS.extend(new_action(group, state, hook, TERMINATING) for hook in hooks)
    with LOCK:
        target = EVENT_TARGETS.get(group.name)
        events = [lifecycle_event(a) for a in ACTIONS[-len(hooks):]] if target else []
    for event in events:
        threading.Thread(target=ssm_agent.post_to, args=(target, event), daemon=True).start()
    if IMDS_URL:
        body = json.dumps({"target_lifecycle_state": "Terminated", "only_for": state.instance.id})
        req = urllib.request.Request(
            IMDS_URL + "/_emulator/state", data=body.encode(), method="POST"
        )
        try:
            urllib.request.urlopen(req, timeout=2).read()
        except OSError:
            pass


def lifecycle_event(action):
    region = "us-east-1"
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "EC2 Instance-%s Lifecycle Action"
        % ("launch" if action["transition"] == LAUNCHING else "terminate"),
        "source": "aws.autoscaling",
        "account": "123456789012",
        "time": ssm_agent.iso(),
        "region": region,
        "resources": [
            f"arn:aws:autoscaling:{region}:123456789012:autoScalingGroup:{uuid.uuid4()}:"
            f"autoScalingGroupName/{action['group']}"
        ],
        "detail": {
            "LifecycleActionToken": action["token"],
            "AutoScalingGroupName": action["group"],
            "LifecycleHookName": action["hook"],
            "EC2InstanceId": action["instance_id"],
            "LifecycleTransition": action["transition"],
            "Origin": "EC2" if action["transition"] == LAUNCHING else "AutoScalingGroup",
            "Destination": "AutoScalingGroup" if action["transition"] == LAUNCHING else "EC2",
        },
    }


def finish(action, result, ended_by):
    action["result"] = result
    action["ended_by"] = ended_by
    action["ended"] = now()
    others = [
        a
        for a in ACTIONS
        if a["instance_id"] == action["instance_id"] and a["result"] is None
    ]
    if others:
        return
    state, group = action["_state"], action["_group"]
    if action.get("transition") == LAUNCHING and result == "CONTINUE":
        state.lifecycle_state = "InService"
        return
    state.lifecycle_state = "Terminated"
    if state in group.instance_states:
        group.instance_states.remove(state)
    try:
        group.autoscaling_backend.ec2_backend.terminate_instances([action["instance_id"]])
    except Exception:  # already gone
        pass


_orig_set_desired_capacity = asm.FakeAutoScalingGroup.set_desired_capacity


def set_desired_capacity(self, new_capacity):
    launch_hooks = terminate_hooks(self, LAUNCHING)
    wanted = int((self.min_size if new_capacity is None else new_capacity) or 0)
    if launch_hooks and wanted > len(self.instance_states):
        before = set(id(s) for s in self.instance_states)
        _orig_set_desired_capacity(self, new_capacity)
        for state in self.instance_states:
            if id(state) not in before:
                start_launch_wait(self, state, launch_hooks)
        return
    hooks = terminate_hooks(self)
    if hooks:
        target = self.min_size if new_capacity is None else new_capacity
        active = [s for s in self.instance_states if s.lifecycle_state == "InService"]
        surplus = len(active) - int(target or 0)
        if surplus > 0:
            for state in [s for s in active if not s.protected_from_scale_in][:surplus]:
                start_wait(self, state, hooks)
            # As AWS: the desired capacity drops now; the waiting instances stay until their
            # actions end (moto's reconciliation would count them out and remove them).
            self.desired_capacity = target
            return
    _orig_set_desired_capacity(self, new_capacity)


asm.FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity


def find_action(resp, operation):
    group = resp._get_param("AutoScalingGroupName")
    with LOCK:
        left = FAULTS["throttle"].get((group, operation), 0)
        if left > 0:
            FAULTS["throttle"][(group, operation)] = left - 1
            THROTTLED.append({"operation": operation, "group": group, "time": now()})
            raise Throttling()
    hook = resp._get_param("LifecycleHookName")
    token = resp._get_param("LifecycleActionToken")
    instance_id = resp._get_param("InstanceId")
    call = {
        "operation": operation,
        "time": now(),
        "token": token,
        "instance_id": instance_id,
        "result": resp._get_param("LifecycleActionResult"),
    }
    with LOCK:
        hooks = resp.autoscaling_backend.lifecycle_hooks
        if f"{group}_{hook}" not in hooks:
            raise ValidationError(f"No Lifecycle Hook found with name {hook} for group {group}")
        if not token and not instance_id:
            raise ValidationError("Either LifecycleActionToken or InstanceId must be specified")
        for a in ACTIONS:
            if a["result"] is not None or a["group"] != group or a["hook"] != hook:
                continue
            if (token and a["token"] == token) or (not token and a["instance_id"] == instance_id):
                a["calls"].append(call)
                return a, call
        # Record calls that found nothing on the most recent matching action, for the tests.
        for a in reversed(ACTIONS):
            if a["instance_id"] == instance_id or a["token"] == token:
                a["calls"].append(dict(call, outcome="no active action"))
                break
    what = f"token {token}" if token else f"instance ID {instance_id}"
    raise ValidationError(f"No active Lifecycle Action found with {what}")


def complete_lifecycle_action(self):
    result = self._get_param("LifecycleActionResult")
    if result not in ("CONTINUE", "ABANDON"):
        raise ValidationError(f"Invalid LifecycleActionResult {result}")
    action, _ = find_action(self, "CompleteLifecycleAction")
    with LOCK:
        finish(action, result, "completed")
    return EmptyResult()


def record_lifecycle_action_heartbeat(self):
    action, _ = find_action(self, "RecordLifecycleActionHeartbeat")
    with LOCK:
        action["deadline"] = min(now() + action["heartbeat_timeout"], action["global_deadline"])
    return EmptyResult()


THROTTLED = []

AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action
AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat


from moto.s3.responses import S3Response  # noqa: E402

_orig_upload_part = S3Response.upload_part


def upload_part(self):
    delay = FAULTS["s3_delay"].get(self.bucket_name, 0)
    if delay:
        time.sleep(delay / 1000)
    return _orig_upload_part(self)


S3Response.upload_part = upload_part


class Bucket:
    """A token bucket: RATE tokens a second, at most BURST; rate 0 never throttles."""

    def __init__(self, rate, burst):
        self.rate, self.burst = float(rate), float(burst or max(1.0, rate))
        self.tokens, self.at = self.burst, time.monotonic()
        self.lock = threading.Lock()

    def take(self):
        if self.rate <= 0:
            return True
        with self.lock:
            t = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (t - self.at) * self.rate)
            self.at = t
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


LIMITS = {}  # name -> Bucket (or a dict of Buckets by prefix for S3)
FLEET_CALLS = {}  # operation -> calls answered
FLEET_THROTTLED = {}  # operation -> calls throttled


def count(table, op):
    with LOCK:
        table[op] = table.get(op, 0) + 1


def limited(name, op, key=None):
    """Counts the call; whether the bucket lets it through."""
    bucket = LIMITS.get(name)
    if isinstance(bucket, dict):
        with LOCK:
            bucket = bucket.setdefault(key, Bucket(*LIMITS["_s3_rate"]))
    if bucket is None or bucket.take():
        count(FLEET_CALLS, op)
        return True
    count(FLEET_THROTTLED, op)
    return False


def query_throttle(namespace):
    body = (
        f'<ErrorResponse xmlns="{namespace}"><Error><Type>Sender</Type><Code>Throttling</Code>'
        "<Message>Rate exceeded</Message></Error><RequestId>fleet</RequestId></ErrorResponse>"
    )
    return 400, {"Content-Type": "text/xml"}, body


def install_limits(a):
    """Wraps the services' dispatch with the buckets given on the command line."""
    from moto.s3.responses import S3Response
    from moto.sns.responses import SNSResponse
    from moto.ssm.responses import SimpleSystemManagerResponse

    LIMITS["as"] = Bucket(a.as_rate, a.as_burst)
    LIMITS["SendCommand"] = Bucket(a.send_rate, a.send_rate)
    LIMITS["ListCommands"] = Bucket(a.list_rate, a.list_rate)
    LIMITS["Publish"] = Bucket(a.sns_rate, a.sns_rate)
    LIMITS["s3"] = {}
    LIMITS["_s3_rate"] = (a.s3_put_rate, a.s3_put_rate)

    as_call = AutoScalingResponse.call_action

    def as_call_action(self):
        if limited("as", self._get_action()):
            return as_call(self)
        return query_throttle("https://autoscaling.amazonaws.com/doc/2011-01-01/")

    AutoScalingResponse.call_action = as_call_action

    ssm_call = SimpleSystemManagerResponse.call_action

    def ssm_call_action(self):
        op = self._get_action()
        if op not in ("SendCommand", "ListCommands") or limited(op, op):
            return ssm_call(self)
        body = '{"__type": "ThrottlingException", "message": "Rate exceeded"}'
        return 400, {"Content-Type": "application/x-amz-json-1.1"}, body

    SimpleSystemManagerResponse.call_action = ssm_call_action

    sns_call = SNSResponse.call_action

    def sns_call_action(self):
        op = self._get_action()
        if op != "Publish" or limited("Publish", op):
            return sns_call(self)
        return query_throttle("http://sns.amazonaws.com/doc/2010-03-31/")

    SNSResponse.call_action = sns_call_action

    slow_down = (
        503,
        {"Content-Type": "application/xml"},
        "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    )

    def s3_limited(orig, op):
        def put(self):
            # The partition a key lands in: the prefix up to its instance segment.
            prefix = "/".join(self.path.split("?")[0].split("/")[:4])
            if limited("s3", op, prefix):
                return orig(self)
            return slow_down

        return put

    S3Response.put_object = s3_limited(S3Response.put_object, "PutObject")
    S3Response.upload_part = s3_limited(S3Response.upload_part, "UploadPart")


def expire_loop():
    while True:
        time.sleep(0.1)
        with LOCK:
            for a in ACTIONS:
                if a["result"] is None and now() >= a["deadline"]:
                    finish(a, a["default_result"], "timeout")


class Control(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_GET(self):
        ours = ssm_agent.control("GET", self.path, None)
        if ours:
            return self.reply(*ours)
        if self.path == "/throttled":
            with LOCK:
                return self.reply(200, json.dumps(THROTTLED))
        if self.path == "/fleet":
            with LOCK:
                return self.reply(
                    200, json.dumps({"calls": FLEET_CALLS, "throttled": FLEET_THROTTLED})
                )
        if self.path != "/actions":
            return self.reply(404, "{}")
        with LOCK:
            public = [{k: v for k, v in a.items() if not k.startswith("_")} for a in ACTIONS]
        self.reply(200, json.dumps(public))

    def do_POST(self):
        body = self.body()
        ours = ssm_agent.control("POST", self.path, body)
        if ours:
            return self.reply(*ours)
        if self.path == "/events":
            with LOCK:
                EVENT_TARGETS[body["group"]] = body["url"]
            return self.reply(200, "{}")
        if self.path == "/faults":
            update = body
            with LOCK:
                for op, n in update.get("throttle", {}).items():
                    FAULTS["throttle"][(update.get("group"), op)] = int(n)
                if "s3_part_delay_ms" in update:
                    FAULTS["s3_delay"][update.get("bucket")] = int(update["s3_part_delay_ms"])
            return self.reply(200, "{}")
        if self.path != "/reset":
            return self.reply(404, "{}")
        with LOCK:
            ACTIONS.clear()
        self.reply(200, "{}")


def main():
    global IMDS_URL
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--imds-url")
    p.add_argument("--as-rate", type=float, default=0)
    p.add_argument("--as-burst", type=float, default=0)
    p.add_argument("--send-rate", type=float, default=0)
    p.add_argument("--list-rate", type=float, default=0)
    p.add_argument("--sns-rate", type=float, default=0)
    p.add_argument("--s3-put-rate", type=float, default=0)
    a = p.parse_args()
    IMDS_URL = a.imds_url
    install_limits(a)
    threading.Thread(target=expire_loop, daemon=True).start()
    control = ThreadingHTTPServer((a.host, a.control_port), Control)
    control.daemon_threads = True
    threading.Thread(target=control.serve_forever, daemon=True).start()
    from moto.server import main as moto_main

    moto_main(["-H", a.host, "-p", str(a.port)])


if __name__ == "__main__":
    main()
