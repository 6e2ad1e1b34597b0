#!/usr/bin/env python3
"""An IMDSv2 emulator for lifeboat's tests: a real HTTP server on loopback.

It speaks what the agent uses: the session token (PUT /latest/api/token with a TTL; 401 on a
missing, unknown or expired token; IMDSv1 requests are refused with 401), instance-id, the
identity document, instance tags (when enabled), autoscaling/target-lifecycle-state, the Spot
instance-action and the rebalance recommendation (404 until set).

A test drives it through a control API on the same port:
  POST /_emulator/state   JSON merged into the state: target_lifecycle_state, spot_action
                          ({"action": ..., "time": ...} or null), rebalance ({"noticeTime": ...}
                          or null), instance_id, group, tags_enabled, region, az, instance_type
  POST /_emulator/fault   {"status": 503, "count": N} answer N metadata requests with a status;
                          {"delay_ms": D, "count": N} answer N late; {"drop": N} close N
                          connections without answering; {"expire_tokens": true} forget tokens
  GET  /_emulator/log     every metadata request seen: [{"method", "path", "status"}]

A fleet (tests/tools/fleet_sim.py): with --fleet FILE (JSON [{"ip", "instance_id", "group"}]) and
--host 0.0.0.0, one server answers for every instance, each at its own loopback address
(127.x.y.z all reach this host): the address a request was sent to picks the instance's state.
A state update with "only_for": ID changes that instance only. --no-log keeps no request log.

Usage: imds.py --port PORT [--instance-id ID] [--group NAME] [--fleet FILE --host 0.0.0.0]
"""
import argparse
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {
    "instance_id": "i-0123456789abcdef0",
    "group": "",
    "tags_enabled": True,
    "region": "us-east-1",
    "az": "us-east-1a",
    "instance_type": "m7g.large",
    "target_lifecycle_state": "InService",
    "spot_action": None,
    "rebalance": None,
}
FLEET = {}  # loopback address -> that instance's state (fleet mode)
BY_ID = {}  # instance id -> the same state
KEEP_LOG = True
TOKENS = {}  # token -> expiry (monotonic seconds)
FAULTS = []  # queue of {"status"|"delay_ms"|"drop", "count"}
LOG = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def reply(self, status, body=b"", content_type="text/plain"):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body_json(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def take_fault(self):
        with LOCK:
            while FAULTS:
                f = FAULTS[0]
                if f["count"] <= 0:
                    FAULTS.pop(0)
                    continue
                f["count"] -= 1
                return dict(f)
        return None

    def record(self, status):
        if not KEEP_LOG:
            return
        with LOCK:
            LOG.append({"method": self.command, "path": self.path, "status": status})

    def state(self):
        """This request's instance: by the address it was sent to in fleet mode."""
        if FLEET:
            return FLEET.get(self.connection.getsockname()[0], STATE)
        return STATE

    def do_POST(self):
        if self.path == "/_emulator/state":
            update = self.body_json()
            only_for = update.pop("only_for", None)
            with LOCK:
                if FLEET:
                    targets = [BY_ID[only_for]] if only_for in BY_ID else []
                    if only_for is None:
                        targets = list(FLEET.values())
                    for t in targets:
                        t.update(update)
                elif only_for is None or only_for == STATE["instance_id"]:
                    STATE.update(update)
            return self.reply(200, "ok")
        if self.path == "/_emulator/fault":
            f = self.body_json()
            with LOCK:
                if f.get("expire_tokens"):
                    TOKENS.clear()
                elif "drop" in f:
                    FAULTS.append({"drop": True, "count": int(f["drop"])})
                else:
                    f.setdefault("count", 1)
                    FAULTS.append(f)
            return self.reply(200, "ok")
        self.reply(404, "not found")

    def do_PUT(self):
        if self.path != "/latest/api/token":
            self.record(404)
            return self.reply(404, "not found")
        if self.fault_answered():
            return
        try:
            ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= 21600:
            self.record(400)
            return self.reply(400, "bad ttl")
        token = secrets.token_urlsafe(24)
        with LOCK:
            TOKENS[token] = time.monotonic() + ttl
        self.record(200)
        self.send_response(200)
        self.send_header("X-aws-ec2-metadata-token-ttl-seconds", str(ttl))
        self.send_header("Content-Length", str(len(token)))
        self.end_headers()
        self.wfile.write(token.encode())

    def fault_answered(self):
        fault = self.take_fault()
        if not fault:
            return False
        if fault.get("drop"):
            self.record(0)
            self.close_connection = True
            self.connection.close()
            return True
        if "delay_ms" in fault:
            time.sleep(fault["delay_ms"] / 1000)
            return False
        self.record(fault["status"])
        self.reply(fault["status"], "fault")
        return True

    def do_GET(self):
        if self.path == "/_emulator/log":
            with LOCK:
                return self.reply(200, json.dumps(LOG), "application/json")
        if self.fault_answered():
            return
        token = self.headers.get("X-aws-ec2-metadata-token")
        with LOCK:
            expiry = TOKENS.get(token)
        if expiry is None or expiry < time.monotonic():
            self.record(401)
            return self.reply(401, "")
        status, body, ctype = self.metadata(self.path)
        self.record(status)
        self.reply(status, body, ctype)

    def metadata(self, path):
        with LOCK:
            s = dict(self.state())
        doc = {
            "instanceId": s["instance_id"],
            "region": s["region"],
            "availabilityZone": s["az"],
            "instanceType": s["instance_type"],
            "accountId": "123456789012",
        }
        routes = {
            "/latest/meta-data/instance-id": s["instance_id"],
            "/latest/dynamic/instance-identity/document": json.dumps(doc),
            "/latest/meta-data/placement/region": s["region"],
            "/latest/meta-data/services/partition": "aws",
            "/latest/meta-data/autoscaling/target-lifecycle-state": s["target_lifecycle_state"],
        }
        if s["spot_action"]:
            routes["/latest/meta-data/spot/instance-action"] = json.dumps(s["spot_action"])
        if s["rebalance"]:
            routes["/latest/meta-data/events/recommendations/rebalance"] = json.dumps(s["rebalance"])
        if s["tags_enabled"] and s["group"]:
            routes["/latest/meta-data/tags/instance/aws:autoscaling:groupName"] = s["group"]
        if path in routes:
            body = routes[path]
            ctype = "application/json" if body.startswith("{") else "text/plain"
            return 200, body, ctype
        return 404, "", "text/plain"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--instance-id")
    p.add_argument("--group")
    p.add_argument("--fleet")
    p.add_argument("--no-log", action="store_true")
    a = p.parse_args()
    global KEEP_LOG
    KEEP_LOG = not a.no_log
    if a.fleet:
        with open(a.fleet) as f:
            for member in json.load(f):
                state = dict(STATE, instance_id=member["instance_id"], group=member["group"])
                FLEET[member["ip"]] = state
                BY_ID[member["instance_id"]] = state
    if a.instance_id:
        STATE["instance_id"] = a.instance_id
    if a.group:
        STATE["group"] = a.group
    server = ThreadingHTTPServer((a.host, a.port), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    server.serve_forever()


if __name__ == "__main__":
    main()
