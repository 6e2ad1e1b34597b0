"""An SSM agent stand-in inside moto's server: Run Command that really runs the document.

moto's SendCommand reports Success at once and accepts a missing document, unknown parameters
and nonexistent instances. Imported by moto_lifecycle.py, this patches moto's SSM backend so that
SendCommand does what SSM and its agent do, on this machine:

- the document must exist in moto (CreateDocument), else InvalidDocument;
- parameters are checked as SSM checks them: unknown names and missing required ones are
  InvalidParameters, defaults fill the rest, and every value must match its `allowedPattern`
  (searched like Java's regex: `$` also matches before a final line break);
- the instance must be registered with this stand-in (POST /ssm/agents), else InvalidInstanceId,
  as for an instance that is not SSM-managed; a registered but offline agent ends Undeliverable;
- each `aws:runShellScript` step is rendered as the agent renders it: `{{ Name }}` replaced by the
  value in the text, and each parameter whose definition says `interpolationType: ENV_VAR` also
  in `SSM_<Name>` (an agent registered as "legacy", older than 3.3.2746.0, sets no variables; the
  names it set are recorded as `agent_env`), then run with `sh`
  under the registered environment and the step's `timeoutSeconds` (or the registration's
  `execution_timeout`), ending Success, Failed or TimedOut;
- POST /ssm/faults {"instance_id": I, "throttle_send": N, "throttle_list": N} answers the next N
  SendCommand / ListCommands calls naming instance I with ThrottlingException (GET /ssm/throttled
  lists them); {"instance_id": I, "slow_send": S} makes the next SendCommand naming I create its
  command and then answer S seconds late;
- every status change is recorded (GET /ssm/commands, a record per instance of a command) and
  sent to the registration's `events_url` (or the target set with POST /ssm/target) as the
  EventBridge event `EC2 Command Invocation Status-change Notification` (per instance, no
  parameters) and, when the command's own status changes, `EC2 Command Status-change
  Notification` (with the parameters; for a command sent to many instances it is Success only
  when all succeeded, and ends when the last does); a registration's `event_statuses` (a list)
  sends only those statuses, as an EventBridge rule matching on `status` does.
"""
import json
import os
import re
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone

from moto.ssm import models as ssm_models
from moto.ssm.exceptions import SSMException

LOCK = threading.RLock()
AGENTS = {}  # instance id -> {"env": {...}, "path": "...", "legacy": bool, "online": bool, ...}
COMMANDS = []  # public records, one per instance of a command
COMMAND_STATUS = {}  # command id -> the command's last status
TARGET = {"url": None}
# Per instance: how many more SendCommand / ListCommands calls naming it are answered with
# ThrottlingException (POST /ssm/faults {"instance_id": I, "throttle_send": N, "throttle_list": N}).
FAULTS = {"throttle_send": {}, "throttle_list": {}, "slow_send": {}}


def take_throttle(kind, instance_ids):
    """Whether this call is throttled (and counts it)."""
    with LOCK:
        for i in instance_ids:
            left = FAULTS[kind].get(i, 0)
            if left > 0:
                FAULTS[kind][i] = left - 1
                THROTTLED.append({"operation": kind, "instance_id": i, "at": time.time()})
                return True
    return False


THROTTLED = []


class InvalidInstanceId(SSMException):
    def __init__(self, ids):
        super().__init__(
            "InvalidInstanceId",
            f"Instances [{ids}] not in a valid state for account",
        )


class InvalidParameters(SSMException):
    def __init__(self, message):
        super().__init__("InvalidParameters", message)


class Throttling(SSMException):
    def __init__(self):
        super().__init__("ThrottlingException", "Rate exceeded")


def iso(t=None):
    t = t or time.time()
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def post_event(record, event):
    url = record.get("target") or TARGET["url"]
    if url:
        post_to(url, event)


def post_to(url, event):
    req = urllib.request.Request(url, data=json.dumps(event).encode(), method="POST")
    try:
        urllib.request.urlopen(req, timeout=5).read()
    except OSError:
        pass


def wanted(record, status):
    """Whether the target's rule passes an event with this status (its `event_statuses`)."""
    return not record.get("_event_statuses") or status in record["_event_statuses"]


def envelope(record, detail_type, resources, detail):
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": "aws.ssm",
        "account": "123456789012",
        "time": iso(),
        "region": record["region"],
        "resources": resources,
        "detail": detail,
    }


def aggregate(records):
    """A command's status from its invocations' (SSM: Success only when all succeeded)."""
    statuses = [r["status"] for r in records]
    if any(s in ("Pending", "InProgress") for s in statuses):
        return "InProgress"
    if all(s == "Success" for s in statuses):
        return "Success"
    return "Failed" if "Failed" in statuses else next(s for s in statuses if s != "Success")


def emit(record, status):
    """One invocation's status change: the invocation event, and the command's event when the
    command's status changes (for a command sent to one instance, every time)."""
    with LOCK:
        record["statuses"].append(status)
        record["status"] = status
        siblings = [r for r in COMMANDS if r["command_id"] == record["command_id"]]
        command_status = aggregate(siblings)
        changed = COMMAND_STATUS.get(record["command_id"]) != command_status
        COMMAND_STATUS[record["command_id"]] = command_status
    arn = f"arn:aws:ec2:{record['region']}:123456789012:instance/{record['instance_id']}"
    if wanted(record, status):
        post_event(record, envelope(record, "EC2 Command Invocation Status-change Notification",
                                    [arn], {
            "command-id": record["command_id"],
            "document-name": record["document_name"],
            "instance-id": record["instance_id"],
            "requested-date-time": iso(record["requested"]),
            "status": status,
        }))
    if changed and wanted(record, command_status):
        post_event(record, envelope(record, "EC2 Command Status-change Notification",
                                    [f"arn:aws:ec2:{record['region']}:123456789012:instance/{r['instance_id']}"
                                     for r in siblings], {
            "command-id": record["command_id"],
            "document-name": record["document_name"],
            "expire-after": iso(time.time() + 3600),
            "parameters": record["parameters"],
            "requested-date-time": iso(record["requested"]),
            "status": command_status,
        }))


def check_parameters(declared, given):
    """SSM's parameter handling: unknown, missing, defaults, allowedPattern."""
    for name in given:
        if name not in declared:
            raise InvalidParameters(f"Parameter \"{name}\" is not defined in the document.")
    values = {}
    for name, spec in declared.items():
        if name in given:
            vals = given[name]
            value = vals[0] if vals else ""
        elif "default" in spec:
            value = str(spec["default"])
        else:
            raise InvalidParameters(f"Parameter \"{name}\" is required.")
        pattern = spec.get("allowedPattern")
        if pattern is not None and re.search(pattern, value) is None:
            raise InvalidParameters(
                f"Parameter \"{name}\" \"{value}\" failed to satisfy constraint: "
                f"Member must satisfy regular expression pattern: {pattern}"
            )
        values[name] = value
    return values


def render(step, values, params, legacy):
    inputs = step["inputs"]
    text = "\n".join(inputs["runCommand"]) + "\n"
    for name, value in values.items():
        text = re.sub(r"\{\{\s*" + re.escape(name) + r"\s*\}\}", lambda _m: value, text)
    env = {}
    if not legacy:
        # Where SSM reads it: each parameter's own definition (a step input of that name is
        # not SSM's and does nothing).
        env = {
            f"SSM_{name}": value
            for name, value in values.items()
            if params.get(name, {}).get("interpolationType") == "ENV_VAR"
        }
    return text, env


def run(record, doc, values, agent):
    if not agent.get("online", True):
        time.sleep(0.2)
        record["output"] = "agent offline"
        emit(record, "Undeliverable")
        return
    emit(record, "InProgress")
    status = "Success"
    for step in doc["mainSteps"]:
        if step["action"] != "aws:runShellScript":
            continue
        text, step_env = render(step, values, doc.get("parameters", {}), agent.get("legacy", False))
        record["agent_env"] = sorted(step_env)
        env = dict(agent.get("env", {}))
        env["PATH"] = agent.get("path", "/usr/bin:/bin")
        env.update(step_env)
        timeout = agent.get("execution_timeout") or int(step["inputs"].get("timeoutSeconds", 3600))
        with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
            f.write(text)
            script = f.name
        try:
            p = subprocess.run(
                ["sh", script],
                env=env,
                cwd=agent.get("cwd") or "/",
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            record["exit_code"] = p.returncode
            record["stdout"] = p.stdout[-24000:]
            record["stderr"] = p.stderr[-8000:]
            if p.returncode != 0:
                status = "Failed"
        except subprocess.TimeoutExpired as e:
            record["stdout"] = (e.stdout or b"")[-24000:].decode(errors="replace")
            status = "TimedOut"
        finally:
            os.unlink(script)
        if status != "Success":
            break
    emit(record, status)


_orig_send_command = ssm_models.SimpleSystemManagerBackend.send_command


def send_command(self, **kw):
    if take_throttle("throttle_send", kw.get("instance_ids") or []):
        raise Throttling()
    name = kw.get("document_name")
    document = self.get_document(name, None, None, "JSON")
    doc = json.loads(document["Content"])
    values = check_parameters(doc.get("parameters", {}), kw.get("parameters") or {})
    ids = list(kw.get("instance_ids") or [])
    with LOCK:
        unknown = [i for i in ids if i not in AGENTS]
    if unknown:
        raise InvalidInstanceId(", ".join(unknown))
    command = _orig_send_command(self, **dict(kw, instance_ids=list(ids)))
    # moto adds every instance in the region when no Targets are given: keep the ones named.
    command.instance_ids = ids
    command.status = "InProgress"
    started = []
    with LOCK:
        for instance_id in ids:
            record = {
                "command_id": command.command_id,
                "document_name": name,
                "instance_id": instance_id,
                "parameters": {k: [v] for k, v in values.items()},
                "region": self.region_name,
                "requested": time.time(),
                "status": "Pending",
                "statuses": [],
                "target": AGENTS[instance_id].get("events_url"),
                "_event_statuses": AGENTS[instance_id].get("event_statuses"),
            }
            COMMANDS.append(record)
            started.append((record, dict(AGENTS[instance_id])))

    def go(record, agent):
        run(record, doc, values, agent)
        with LOCK:
            command.status = COMMAND_STATUS.get(command.command_id, record["status"])

    for record, agent in started:
        threading.Thread(target=go, args=(record, agent), daemon=True).start()
    with LOCK:
        slow = max([FAULTS["slow_send"].pop(i, 0) for i in ids] or [0])
    if slow:
        # The command exists and runs; the answer comes late (the caller may have given up).
        time.sleep(slow)
    return command


ssm_models.SimpleSystemManagerBackend.send_command = send_command

_orig_list_commands = ssm_models.SimpleSystemManagerBackend.list_commands


def list_commands(self, command_id=None, instance_id=None, **kw):
    if instance_id and take_throttle("throttle_list", [instance_id]):
        raise Throttling()
    return _orig_list_commands(self, command_id=command_id, instance_id=instance_id, **kw)


ssm_models.SimpleSystemManagerBackend.list_commands = list_commands


def control(method, path, body):
    """Control routes under /ssm; returns (status, json) or None when the path is not ours."""
    if method == "GET" and path == "/ssm/commands":
        with LOCK:
            return 200, json.dumps(COMMANDS)
    if method == "GET" and path == "/ssm/throttled":
        with LOCK:
            return 200, json.dumps(THROTTLED)
    if method != "POST":
        return None
    if path == "/ssm/agents":
        with LOCK:
            AGENTS[body["instance_id"]] = body
        return 200, "{}"
    if path == "/ssm/target":
        TARGET["url"] = body.get("url")
        return 200, "{}"
    if path == "/ssm/faults":
        with LOCK:
            for kind in ("throttle_send", "throttle_list"):
                if kind in body:
                    FAULTS[kind][body["instance_id"]] = int(body[kind])
            if "slow_send" in body:
                FAULTS["slow_send"][body["instance_id"]] = float(body["slow_send"])
        return 200, "{}"
    return None
