#!/usr/bin/env python3
"""Interoperability checks of a running FerroMQ server with stomp.py (STOMP 1.2).

Usage: stomp_py_interop.py HOST PORT [--user U --password P]
                          [--limited-user U --limited-password P]

The limited user must exist and must NOT be allowed to send to
/queue/interop.forbidden (the Rust test t04 creates it). Prints one line per
check and exits non-zero on the first failure.
"""

import argparse
import queue
import sys
import threading
import time
import uuid

try:
    import stomp
except ImportError:  # pragma: no cover
    print("FAIL stomp.py is not installed: pip install stomp.py")
    sys.exit(2)

WAIT = 5.0
RUN = uuid.uuid4().hex[:8]  # keeps reruns against one server apart


def dest(kind, name):
    return "/%s/interop.%s.%s" % (kind, name, RUN)


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


class Collector(stomp.ConnectionListener):
    """Collects every frame a connection receives."""

    def __init__(self):
        self.messages = queue.Queue()
        self.errors = []
        self.receipts = set()
        self.receipt_headers = {}
        self.heartbeats = 0
        self.heartbeat_timeouts = 0
        self.disconnected = False
        self.connected_headers = None
        self.cond = threading.Condition()

    def on_connected(self, frame):
        self.connected_headers = dict(frame.headers)

    def on_message(self, frame):
        self.messages.put(frame)

    def on_receipt(self, frame):
        with self.cond:
            self.receipts.add(frame.headers.get("receipt-id"))
            self.receipt_headers[frame.headers.get("receipt-id")] = dict(frame.headers)
            self.cond.notify_all()

    def on_error(self, frame):
        with self.cond:
            self.errors.append(frame)
            self.cond.notify_all()

    def on_heartbeat(self):
        self.heartbeats += 1

    def on_heartbeat_timeout(self):
        self.heartbeat_timeouts += 1

    def on_disconnected(self):
        with self.cond:
            self.disconnected = True
            self.cond.notify_all()

    def wait_receipt(self, rid, timeout=WAIT):
        deadline = time.time() + timeout
        with self.cond:
            while rid not in self.receipts:
                if self.errors:
                    raise Failure("ERROR instead of RECEIPT %s: %s %s" % (
                        rid, self.errors[-1].headers, self.errors[-1].body))
                left = deadline - time.time()
                if left <= 0:
                    raise Failure("no RECEIPT %s within %.0f s" % (rid, timeout))
                self.cond.wait(left)

    def wait_error(self, timeout=WAIT):
        deadline = time.time() + timeout
        with self.cond:
            while not self.errors:
                left = deadline - time.time()
                if left <= 0:
                    raise Failure("no ERROR within %.0f s" % timeout)
                self.cond.wait(left)
            return self.errors[-1]

    def message(self, timeout=WAIT, what="a MESSAGE"):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise Failure("expected %s within %.1f s, got nothing" % (what, timeout))

    def no_message(self, timeout=0.7, what="no MESSAGE"):
        try:
            f = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise Failure("expected %s, got %s %r" % (what, f.headers, f.body))


class Client:
    """A stomp.py 1.2 connection with a collector and receipt helpers."""

    def __init__(self, args, user=None, password=None, heartbeats=(0, 0), **connect_headers):
        self.conn = stomp.Connection12([(args.host, args.port)], heartbeats=heartbeats,
                                       reconnect_attempts_max=1)
        self.l = Collector()
        self.conn.set_listener("collector", self.l)
        self.conn.connect(user or args.user, password or args.password, wait=True,
                          headers=connect_headers)
        self.n = 0

    def rid(self, prefix):
        self.n += 1
        return "%s-%d" % (prefix, self.n)

    def send(self, destination, body, **headers):
        r = self.rid("send")
        self.conn.send(destination, body, headers=headers, receipt=r)
        self.l.wait_receipt(r)
        return self.l.receipt_headers.get(r, {})

    def subscribe(self, destination, sid, ack="auto", **headers):
        r = self.rid("sub")
        self.conn.subscribe(destination, id=sid, ack=ack, headers=headers, receipt=r)
        self.l.wait_receipt(r)

    def unsubscribe(self, sid, **headers):
        r = self.rid("unsub")
        self.conn.unsubscribe(id=sid, headers=headers, receipt=r)
        self.l.wait_receipt(r)

    def ack(self, frame, transaction=None):
        r = self.rid("ack")
        self.conn.ack(frame.headers["ack"], transaction=transaction, receipt=r)
        self.l.wait_receipt(r)

    def nack(self, frame):
        r = self.rid("nack")
        self.conn.nack(frame.headers["ack"], receipt=r)
        self.l.wait_receipt(r)

    def close(self):
        if self.conn.is_connected():
            self.conn.disconnect(receipt=self.rid("bye"))


def drain(args, destination):
    """Consumes and acknowledges whatever is left on a queue."""
    c = Client(args)
    c.subscribe(destination, "drain", ack="auto")
    while True:
        try:
            c.l.messages.get(timeout=0.5)
        except queue.Empty:
            break
    c.close()


CHECKS = []


def interop(fn):
    CHECKS.append(fn)
    return fn


@interop
def connect_with_login(args):
    c = Client(args)
    h = c.l.connected_headers or {}
    check(h.get("version") == "1.2", "CONNECTED version is 1.2: %s" % h)
    check("server" in h and "session" in h, "CONNECTED has server and session: %s" % h)
    c.close()


@interop
def queue_send_receive_with_receipts(args):
    q = dest("queue", "basic")
    c = Client(args)
    c.subscribe(q, "s1")
    c.send(q, "hello from stomp.py")
    m = c.l.message()
    check(m.body == "hello from stomp.py", "body round-trips: %r" % m.body)
    check(m.headers.get("destination") == q, "destination header: %s" % m.headers)
    check(m.headers.get("subscription") == "s1", "subscription header: %s" % m.headers)
    check(m.headers.get("message-id"), "message-id present")
    c.close()


@interop
def custom_headers_reply_to_correlation_id(args):
    q = dest("queue", "request")
    replies = dest("queue", "replies")
    body = "h\u00e9llo w\u00f6rld \u2603"
    requester = Client(args)
    responder = Client(args)
    responder.subscribe(q, "req", ack="client-individual")
    requester.subscribe(replies, "rep")
    requester.send(q, body, **{"reply-to": replies, "correlation-id": "corr-42",
                               "x-custom": "value with spaces", "x-colon": "a:b",
                               "content-type": "text/plain;charset=utf-8"})
    m = responder.l.message(what="the request")
    check(m.body == body, "unicode body round-trips: %r" % m.body)
    for k, v in (("reply-to", replies), ("correlation-id", "corr-42"),
                 ("x-custom", "value with spaces"), ("x-colon", "a:b")):
        check(m.headers.get(k) == v, "header %s=%r kept: %s" % (k, v, m.headers))
    responder.send(m.headers["reply-to"], "pong",
                   **{"correlation-id": m.headers["correlation-id"]})
    responder.ack(m)
    r = requester.l.message(what="the reply")
    check(r.body == "pong" and r.headers.get("correlation-id") == "corr-42",
          "reply carries the correlation-id: %s %r" % (r.headers, r.body))
    requester.close()
    responder.close()


@interop
def priority_ordering(args):
    q = dest("queue", "prio")
    c = Client(args)
    for p in (1, 5, 9, 0, 7, 4):
        c.send(q, "p%d" % p, priority=str(p))
    c.subscribe(q, "s", ack="client-individual")
    got = []
    for _ in range(6):
        m = c.l.message()
        got.append(int(m.headers.get("priority")))
        c.ack(m)
    check(got == sorted(got, reverse=True), "delivered highest priority first: %s" % got)
    c.close()


@interop
def topic_fan_out(args):
    t = dest("topic", "fan")
    a, b = Client(args), Client(args)
    a.subscribe(t, "a")
    b.subscribe(t, "b")
    pub = Client(args)
    pub.send(t, "to everyone")
    for name, c in (("first", a), ("second", b)):
        m = c.l.message(what="the topic message on the %s subscriber" % name)
        check(m.body == "to everyone", "%s subscriber body: %r" % (name, m.body))
        c.l.no_message(0.3, "only one copy on the %s subscriber" % name)
    for c in (a, b, pub):
        c.close()


@interop
def durable_subscription_survives_disconnect(args):
    t = dest("topic", "durable")
    cid = "py-durable-" + RUN
    c = Client(args, **{"client-id": cid})
    c.subscribe(t, "d", ack="client-individual", **{"activemq.subscriptionName": "py-sub"})
    c.close()
    pub = Client(args)
    pub.send(t, "while you were away", persistent="true")
    pub.close()
    c = Client(args, **{"client-id": cid})
    c.subscribe(t, "d", ack="client-individual", **{"activemq.subscriptionName": "py-sub"})
    m = c.l.message(what="the message published while the durable subscriber was offline")
    check(m.body == "while you were away", "durable body: %r" % m.body)
    c.ack(m)
    # Remove it: UNSUBSCRIBE with the subscription name deletes it.
    c.unsubscribe("d", **{"activemq.subscriptionName": "py-sub"})
    c.close()


@interop
def ack_mode_auto(args):
    q = dest("queue", "auto")
    c = Client(args)
    c.send(q, "auto-1")
    c.subscribe(q, "s", ack="auto")
    check(c.l.message().body == "auto-1", "auto delivery")
    c.close()
    c = Client(args)
    c.subscribe(q, "s", ack="auto")
    c.l.no_message(0.7, "nothing redelivered after an auto-ack delivery")
    c.close()


@interop
def ack_mode_client_is_cumulative(args):
    q = dest("queue", "client")
    c = Client(args)
    for i in range(3):
        c.send(q, "c%d" % i)
    c.subscribe(q, "s", ack="client")
    ms = [c.l.message() for _ in range(3)]
    check([m.body for m in ms] == ["c0", "c1", "c2"], "FIFO: %s" % [m.body for m in ms])
    c.ack(ms[1])  # acknowledges c0 and c1
    c.close()
    c = Client(args)
    c.subscribe(q, "s", ack="client")
    m = c.l.message(what="the unacknowledged c2")
    check(m.body == "c2", "only c2 comes back: %r" % m.body)
    check(m.headers.get("redelivered") == "true", "c2 is redelivered:true: %s" % m.headers)
    c.ack(m)
    c.l.no_message(0.5, "nothing else after c2")
    c.close()


@interop
def ack_mode_client_individual(args):
    q = dest("queue", "individual")
    c = Client(args)
    for i in range(3):
        c.send(q, "i%d" % i)
    c.subscribe(q, "s", ack="client-individual")
    ms = [c.l.message() for _ in range(3)]
    c.ack(ms[0])
    c.ack(ms[2])
    c.close()
    c = Client(args)
    c.subscribe(q, "s", ack="client-individual")
    m = c.l.message(what="the unacknowledged i1")
    check(m.body == "i1", "only i1 comes back: %r" % m.body)
    c.ack(m)
    c.l.no_message(0.5, "nothing else after i1")
    c.close()


@interop
def nack_then_redelivered(args):
    q = dest("queue", "nack")
    c = Client(args)
    c.send(q, "try again")
    c.subscribe(q, "s", ack="client-individual")
    m = c.l.message()
    check(m.headers.get("redelivered") != "true", "first delivery is not redelivered")
    c.nack(m)
    m2 = c.l.message(what="the NACKed message again")
    check(m2.body == "try again", "same body after NACK")
    check(m2.headers.get("redelivered") == "true", "redelivered:true after NACK: %s" % m2.headers)
    c.ack(m2)
    c.close()


@interop
def dead_letter_after_redelivery_limit(args):
    q = dest("queue", "poison")
    c = Client(args)
    c.send(q, "poison", poisonid=RUN)
    c.subscribe(q, "s", ack="client-individual")
    deliveries = 0
    while True:
        try:
            m = c.l.messages.get(timeout=1.5)
        except queue.Empty:
            break
        deliveries += 1
        check(deliveries <= 50, "message still redelivered after 50 NACKs: no DLQ")
        c.nack(m)
    check(deliveries >= 2, "redelivered at least once before the DLQ (%d)" % deliveries)
    c.close()
    d = Client(args)
    d.subscribe("/queue/DLQ", "dlq", ack="client-individual", selector="poisonid = '%s'" % RUN)
    m = d.l.message(what="the poison message on /queue/DLQ after %d deliveries" % deliveries)
    check(m.body == "poison", "DLQ body: %r" % m.body)
    check(m.headers.get("original-destination") == q,
          "original-destination names %s: %s" % (q, m.headers))
    d.ack(m)
    d.close()
    print("     (dead-lettered after %d deliveries)" % deliveries)


@interop
def transactions_commit_and_abort(args):
    q = dest("queue", "tx")
    consumer = Client(args)
    consumer.subscribe(q, "s", ack="client-individual")
    p = Client(args)
    tx = p.conn.begin()
    p.conn.send(q, "tx-1", transaction=tx)
    p.conn.send(q, "tx-2", transaction=tx)
    consumer.l.no_message(0.7, "nothing before COMMIT")
    r = p.rid("commit")
    p.conn.commit(tx, receipt=r)
    p.l.wait_receipt(r)
    got = [consumer.l.message(what="committed message").body for _ in range(2)]
    check(got == ["tx-1", "tx-2"], "both committed messages in order: %s" % got)
    tx = p.conn.begin()
    p.conn.send(q, "aborted", transaction=tx)
    r = p.rid("abort")
    p.conn.abort(tx, receipt=r)
    p.l.wait_receipt(r)
    consumer.l.no_message(0.7, "nothing after ABORT")
    p.close()
    consumer.close()


@interop
def transactional_ack_abort_keeps_message(args):
    q = dest("queue", "txack")
    c = Client(args)
    c.send(q, "keep me")
    c.subscribe(q, "s", ack="client-individual")
    m = c.l.message()
    tx = c.conn.begin()
    c.conn.ack(m.headers["ack"], transaction=tx)
    r = c.rid("abort")
    c.conn.abort(tx, receipt=r)
    c.l.wait_receipt(r)
    c.close()
    c = Client(args)
    c.subscribe(q, "s", ack="client-individual")
    m = c.l.message(what="the message whose transactional ACK was aborted")
    check(m.body == "keep me", "body %r" % m.body)
    tx = c.conn.begin()
    c.conn.ack(m.headers["ack"], transaction=tx)
    r = c.rid("commit")
    c.conn.commit(tx, receipt=r)
    c.l.wait_receipt(r)
    c.close()
    c = Client(args)
    c.subscribe(q, "s")
    c.l.no_message(0.7, "nothing after a committed transactional ACK")
    c.close()


@interop
def selector(args):
    q = dest("queue", "sel")
    c = Client(args)
    c.send(q, "blue", color="blue")
    c.send(q, "red", color="red", weight="5")
    c.subscribe(q, "s", ack="client-individual", selector="color = 'red' AND weight > 3")
    m = c.l.message(what="the red message")
    check(m.body == "red", "selector picks red: %r" % m.body)
    c.ack(m)
    c.l.no_message(0.5, "the blue message is not selected")
    c.close()
    drain(args, q)


@interop
def expires(args):
    q = dest("queue", "exp")
    c = Client(args)
    now = int(time.time() * 1000)
    c.send(q, "stale", expires=str(now + 300))
    c.send(q, "fresh", expires=str(now + 600000))
    time.sleep(0.8)
    c.subscribe(q, "s")
    m = c.l.message(what="the unexpired message")
    check(m.body == "fresh", "expired message dropped, got %r" % m.body)
    c.l.no_message(0.5, "no expired message")
    c.close()


@interop
def wrong_password_gets_error(args):
    conn = stomp.Connection12([(args.host, args.port)], reconnect_attempts_max=1)
    l = Collector()
    conn.set_listener("c", l)
    try:
        conn.connect(args.user, "not-the-password", wait=True)
        raise Failure("connect with a wrong password succeeded")
    except stomp.exception.ConnectFailedException:
        pass
    check(l.errors, "an ERROR frame was received")
    msg = l.errors[0].headers.get("message", "")
    check("authentication" in msg.lower(), "ERROR names authentication: %r" % msg)
    try:
        conn.disconnect()
    except Exception:
        pass


@interop
def send_without_permission_names_destination(args):
    forbidden = "/queue/interop.forbidden"
    c = Client(args, user=args.limited_user, password=args.limited_password)
    c.conn.send(forbidden, "nope", receipt="forbidden")
    e = c.l.wait_error()
    text = e.headers.get("message", "") + " " + (e.body or "")
    check(forbidden in text, "ERROR names %s: %r" % (forbidden, text))
    check("forbidden" not in c.l.receipts, "no RECEIPT for the refused SEND")
    try:
        c.conn.disconnect()
    except Exception:
        pass


@interop
def heart_beats_negotiated(args):
    c = Client(args, heartbeats=(1000, 1000))
    h = c.l.connected_headers or {}
    hb = h.get("heart-beat", "0,0")
    sx, sy = (int(x) for x in hb.split(","))
    check(sx > 0 and sy > 0, "server offers heart-beats: %r" % hb)
    time.sleep(3.0)
    check(c.conn.is_connected() and not c.l.disconnected, "still connected after 3 s")
    check(c.l.heartbeat_timeouts == 0, "no heart-beat timeout")
    q = dest("queue", "hb")
    c.subscribe(q, "s")
    c.send(q, "alive")
    check(c.l.message().body == "alive", "usable after 3 s of heart-beats")
    print("     (server heart-beat %s; %d heart-beats received in 3 s)" % (hb, c.l.heartbeats))
    if sx <= 1000:
        check(c.l.heartbeats >= 1, "server heart-beats arrive (%d)" % c.l.heartbeats)
    c.close()


@interop
def producer_id_and_sequence_drop_resends(args):
    # docs/dedupe.md: a resend with the same producer id and sequence is
    # receipted with fmq-duplicate:true and not delivered again.
    q = dest("queue", "dedupe")
    producer = "stomp.py-%s" % RUN
    c = Client(args)
    first = c.send(q, "seq 1", **{"fmq-producer-id": producer, "fmq-sequence": "1"})
    check("fmq-duplicate" not in first, "a first send is not a duplicate: %s" % first)
    c.send(q, "seq 2", **{"fmq-producer-id": producer, "fmq-sequence": "2"})
    again = c.send(q, "seq 2 again", **{"fmq-producer-id": producer, "fmq-sequence": "2"})
    check(again.get("fmq-duplicate") == "true",
          "a resend is receipted with fmq-duplicate:true: %s" % again)
    c.close()
    # A new connection (as after a failover) is still the same producer.
    c = Client(args)
    late = c.send(q, "seq 1 late", **{"fmq-producer-id": producer, "fmq-sequence": "1"})
    check(late.get("fmq-duplicate") == "true", "dropped on a new connection: %s" % late)
    c.subscribe(q, "s")
    got = [c.l.message(what="stored message").body for _ in range(2)]
    check(got == ["seq 1", "seq 2"], "each stored once, in order: %s" % got)
    c.l.no_message(0.7, "no duplicate delivered")
    c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--user", default="admin")
    ap.add_argument("--password", default="passwd")
    ap.add_argument("--limited-user", default="interop-limited")
    ap.add_argument("--limited-password", default="limited-pw")
    args = ap.parse_args()
    version = stomp.__version__
    if not isinstance(version, str):
        version = ".".join(map(str, version))
    print("stomp.py %s against %s:%d" % (version, args.host, args.port))
    passed = 0
    for fn in CHECKS:
        name = fn.__name__
        start = time.time()
        try:
            fn(args)
        except Exception as e:  # Failure, or anything stomp.py raised
            print("FAIL %s: %s: %s" % (name, type(e).__name__, e))
            print("stomp.py interop: FAILED at check %d of %d (%s)" % (passed + 1, len(CHECKS), name))
            return 1
        passed += 1
        print("ok   %s (%.2f s)" % (name, time.time() - start))
    print("stomp.py interop: all %d checks ok" % passed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
