#!/usr/bin/env python3
"""Whole-gateway login benchmark (issue 19, acceptance 5): RSS of a running
`edgebridge` before and after 1,000 logins (half good, half wrong, in two
bursts of 500 at once), then how long a legitimate client waits for its
CONNACK while 500 wrong passwords arrive at once, and 1,000 clients
connected at once with the default `max_connections`.

    bench/logins.py [BINARY]      (default target/release/edgebridge)

Starts its own gateway on a free loopback port with one user; prints one
table. Needs python3 only."""
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/edgebridge"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def mqtt_str(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(cid, user, pw):
    body = mqtt_str("MQTT") + bytes([4, 0xC2, 0, 0]) + mqtt_str(cid) + mqtt_str(user) + mqtt_str(pw)
    return bytes([0x10, len(body)]) + body


def login(port, cid, pw, results, i):
    t0 = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(connect_packet(cid, "evse", pw))
        ack = s.recv(4)
        s.close()
        results[i] = (ack[3] if len(ack) == 4 else None, time.monotonic() - t0)
    except OSError:
        results[i] = (None, time.monotonic() - t0)


def burst(port, n, good_every, prefix):
    results = [None] * n
    threads = []
    for i in range(n):
        pw = "evse-pw" if good_every and i % good_every == 0 else "wrong"
        t = threading.Thread(target=login, args=(port, f"{prefix}{i}", pw, results, i))
        threads.append(t)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def many_clients(port, n):
    """`n` clients (all from this one address, with the one user's
    password) connecting at once; one told "server unavailable" (code 3:
    too many password checks waiting) retries after 200 ms, as clients do.
    Returns (accepted at the first try, seconds until all were in, sockets)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 64)), hard))
    start = time.monotonic()
    connected, first, todo = [], None, list(range(n))
    while todo and time.monotonic() - start < 60:
        socks = []
        for i in todo:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(connect_packet(f"many{i}", "evse", "evse-pw"))
            socks.append((i, s))
        todo = []
        for i, s in socks:
            try:
                ack = s.recv(4)
            except OSError:
                ack = b""
            if ack == b"\x20\x02\x00\x00":
                connected.append(s)
            else:
                s.close()
                todo.append(i)
        if first is None:
            first = len(connected)
        if todo:
            time.sleep(0.2)
    return first, (time.monotonic() - start) if not todo else None, connected


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    port = free_port()
    work = tempfile.mkdtemp()
    hash_ = subprocess.run([BIN, "passwd", "evse"], input=b"evse-pw\n", capture_output=True, check=True)
    entry = hash_.stdout.decode().strip()
    with open(os.path.join(work, "config.yaml"), "w") as f:
        f.write(f'gateway: {{ id: bench, data_dir: {work}/data }}\n'
                f'broker:\n  listeners:\n    - {{ bind: "127.0.0.1:{port}", protocol: mqtt }}\n'
                f'  users:\n    {entry}\n')
    gw = subprocess.Popen([BIN, "-c", os.path.join(work, "config.yaml"), "run"],
                          stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        # One login of each kind first: buffers that live for the process
        # (the check threads' argon2 memory) are allocated here.
        burst(port, 2, 2, "warm")
        time.sleep(1)
        before = rss_kib(gw.pid)
        peak = before
        answered = 0
        for round_ in range(2):
            r = burst(port, 500, 2, f"r{round_}-")
            answered += sum(1 for x in r if x and x[0] is not None)
            peak = max(peak, rss_kib(gw.pid))
        time.sleep(2)
        after = rss_kib(gw.pid)
        # A legitimate login 5 ms into a burst of 500 wrong passwords.
        legit = [None]
        flood = threading.Thread(target=burst, args=(port, 500, 0, "flood"))
        flood.start()
        time.sleep(0.005)
        login(port, "legit", "evse-pw", legit, 0)
        flood.join()
        code, waited = legit[0]
        time.sleep(1)
        first, all_in, socks = many_clients(port, 1000)
        many_rss = rss_kib(gw.pid)
        for c in socks:
            c.close()
        print("| what | figure |")
        print("|---|---|")
        print(f"| RSS before 1,000 logins | {before / 1024:.1f} MiB |")
        print(f"| RSS after (peak) | {after / 1024:.1f} MiB ({peak / 1024:.1f}) |")
        print(f"| growth | {(after - before) / 1024:+.2f} MiB |")
        print(f"| logins answered with a CONNACK | {answered} of 1000 |")
        print(f"| legitimate login during 500 wrong | CONNACK code {code} after {waited * 1000:.0f} ms |")
        took = f"all in after {all_in:.1f} s" if all_in is not None else "NOT all in within 60 s"
        print(f"| 1,000 clients from one address at once (retrying when told busy) | {first} in at the first try, {took}; {len(socks)} connected, RSS {many_rss / 1024:.1f} MiB |")
    finally:
        gw.terminate()
        gw.wait()


if __name__ == "__main__":
    main()
