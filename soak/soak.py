#!/usr/bin/env python3
"""Fault-injection soak for edgebridge (see soak/README.md).

Runs the real binary with two Modbus RTU slaves on a pseudo-terminal, a
Modbus TCP device, a simulator driving a sequence-number rule, a rule that
gets replaced by an infinite loop (SIGHUP), and a bridge to a private
Mosquitto, while a schedule injects faults. At the end it checks that every
sequence number reached the cloud broker, that memory and file descriptors
did not grow, that every fault shows in the metrics and logs, and that the
gateway never restarted. Python standard library only, plus the mosquitto
and mosquitto_sub binaries.

usage: soak.py --binary target/debug/edgebridge --duration 180 [--out DIR]
"""

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tty
import urllib.request

# ---------------------------------------------------------------- helpers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, within=20.0):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def crc16(data):
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


class Registers:
    """Holding/input registers of one simulated slave: 0 counts answers."""

    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()

    def read(self, start, n):
        with self.lock:
            self.count = (self.count + 1) & 0xFFFF
            regs = [self.count, 200 + random.randint(-5, 5)] + [7] * 14
        return [regs[(start + i) % len(regs)] for i in range(n)]


def answer_pdu(regs, pdu):
    """A response PDU for a read request PDU (FC 3/4), or an exception."""
    if len(pdu) < 5 or pdu[0] not in (3, 4):
        return bytes([pdu[0] | 0x80 if pdu else 0x81, 1])
    start, n = struct.unpack(">HH", pdu[1:5])
    if not 1 <= n <= 125:
        return bytes([pdu[0] | 0x80, 3])
    words = regs.read(start, n)
    return bytes([pdu[0], 2 * n]) + b"".join(struct.pack(">H", w) for w in words)


# ------------------------------------------------------------- RTU devices


class RtuBus:
    """Slaves 1 and 2 on a pseudo-terminal reached through a symlink, so the
    port can vanish (master closed: the gateway reads EOF/EIO) and return
    (a new pty behind the same path)."""

    def __init__(self, link):
        self.link = link
        self.slaves = {1: Registers(), 2: Registers()}
        self.mode = "ok"  # ok | silent | garbage | gone
        self.master = None
        self.stop = False
        self.answers = 0
        self._open()
        threading.Thread(target=self._serve, daemon=True).start()

    def _open(self):
        master, slave = os.openpty()
        tty.setraw(slave)
        name = os.ttyname(slave)
        # The gateway opens the path; our slave fd only keeps it alive.
        self.slave_fd = slave
        tmp = self.link + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(name, tmp)
        os.replace(tmp, self.link)
        self.master = master

    def vanish(self):
        self.mode = "gone"
        m, s = self.master, self.slave_fd
        self.master = None
        if os.path.lexists(self.link):
            os.unlink(self.link)
        for fd in (m, s):
            try:
                os.close(fd)
            except OSError:
                pass

    def come_back(self):
        self._open()
        self.mode = "ok"

    def _serve(self):
        buf = b""
        while not self.stop:
            m = self.master
            if m is None:
                time.sleep(0.05)
                buf = b""
                continue
            try:
                r, _, _ = select.select([m], [], [], 0.1)
                if not r:
                    buf = b""  # a gap ends a frame
                    continue
                chunk = os.read(m, 256)
            except OSError:
                time.sleep(0.05)
                continue
            buf += chunk
            while len(buf) >= 8:
                frame, buf = buf[:8], buf[8:]
                if crc16(frame[:6]) != frame[6:8]:
                    buf = b""
                    break
                slave = frame[0]
                if slave not in self.slaves or self.mode == "silent":
                    continue
                if self.mode == "garbage":
                    out = bytes(random.getrandbits(8) for _ in range(random.randint(1, 40)))
                else:
                    pdu = answer_pdu(self.slaves[slave], frame[1:6])
                    body = bytes([slave]) + pdu
                    out = body + crc16(body)
                try:
                    os.write(m, out)
                    self.answers += 1
                except OSError:
                    pass


# ------------------------------------------------------------- TCP device


class TcpDevice:
    def __init__(self, port):
        self.regs = Registers()
        self.mode = "ok"  # ok | silent
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        buf = b""
        with c:
            while True:
                try:
                    data = c.recv(512)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while len(buf) >= 7:
                    tid, pid, length, unit = struct.unpack(">HHHB", buf[:7])
                    if len(buf) < 6 + length:
                        break
                    pdu, buf = buf[7 : 6 + length], buf[6 + length :]
                    if self.mode == "silent":
                        continue
                    out = answer_pdu(self.regs, pdu)
                    try:
                        c.sendall(struct.pack(">HHHB", tid, 0, len(out) + 1, unit) + out)
                    except OSError:
                        return


# ------------------------------------------------------------ MQTT bits


def mqtt_packet(header, body):
    n, rl = len(body), b""
    while True:
        b, n = n % 128, n // 128
        rl += bytes([b | (0x80 if n else 0)])
        if not n:
            break
    return bytes([header]) + rl + body


def mqtt_str(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def mqtt_connect(port, client_id, timeout=5.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(mqtt_packet(0x10, mqtt_str("MQTT") + bytes([4, 0x02, 0, 30]) + mqtt_str(client_id)))
    ack = s.recv(4)
    if ack != b"\x20\x02\x00\x00":
        s.close()
        raise RuntimeError(f"CONNACK {ack!r}")
    return s


class Churn:
    """Local clients connecting and disconnecting as fast as they can."""

    def __init__(self, port):
        self.port, self.active, self.done, self.failed = port, False, 0, 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        i = 0
        while True:
            if not self.active:
                time.sleep(0.1)
                continue
            i += 1
            try:
                s = mqtt_connect(self.port, f"churn-{i % 50}", timeout=2)
                if i % 3 == 0:
                    s.sendall(b"\xe0\x00")
                s.close()  # abrupt close otherwise
                self.done += 1
            except (OSError, RuntimeError):
                self.failed += 1
                time.sleep(0.05)


def warm_up(port):
    """Brings the gateway's buffers and the allocator's arenas to their
    steady size before memory is measured (the rumqttd engine kept 4 x 256
    KiB per subscribed filter; rmqtt keeps no such log, but queues and
    arenas still settle); at the soak's own rate (about 30 messages a
    second) that takes long, and the filling would look like a leak. A subscriber on `#`
    makes the filter the slow subscriber uses later; the payloads are not
    numbers, so the sequence checks ignore them."""
    log("warm-up: filling the broker's per-filter logs")
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", "soak-warmup",
                            "-t", "#"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    line = "warm" + "w" * 146 + "\n"
    for topic, n, qos in [("devices/warmup/x", 60000, "0"), ("soak/warmup", 20000, "1"),
                          ("soak/seq", 20000, "1")]:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-i", "soak-warmup-pub",
                        "-l", "-t", topic, "-q", qos], input=(line * n).encode(), check=True)
    time.sleep(10)
    sub.terminate()
    sub.wait()


class SlowSubscriber:
    """Subscribes to everything at QoS 1 and reads 512 bytes a second."""

    def __init__(self, port):
        self.port, self.active, self.sock = port, False, None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            if not self.active:
                if self.sock:
                    self.sock.close()
                    self.sock = None
                time.sleep(0.2)
                continue
            try:
                if self.sock is None:
                    self.sock = mqtt_connect(self.port, "slow-sub")
                    self.sock.sendall(mqtt_packet(0x82, b"\x00\x01" + mqtt_str("#") + b"\x01"))
                self.sock.settimeout(1)
                self.sock.recv(512)
            except (OSError, RuntimeError):
                if self.sock:
                    self.sock.close()
                self.sock = None
            time.sleep(1)


# --------------------------------------------------------------- process


def proc_sample(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])  # KiB
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19])
    return rss, fds, start


def metrics(port):
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError as e:
        return {"_error": str(e)}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            pass
    return out


def msum(m, name, **labels):
    total = 0.0
    for k, v in m.items():
        if k == name or k.startswith(name + "{"):
            if all(f'{lk}="{lv}"' in k for lk, lv in labels.items()):
                total += v
    return total


class Mosquitto:
    def __init__(self, d, port):
        self.d, self.port, self.p = d, port, None
        with open(os.path.join(d, "mosquitto.conf"), "w") as f:
            f.write(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                f"persistence_location {d}/\nautosave_interval 1\nmax_queued_messages 0\n"
                f"log_dest file {d}/mosquitto.log\n"
                # As root, Mosquitto would switch to its own user, which
                # cannot write the persistence file in our private dir.
                + ("user root\n" if os.geteuid() == 0 else "")
            )

    def start(self):
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.p = subprocess.Popen([exe, "-c", os.path.join(self.d, "mosquitto.conf")])
        wait_port(self.port)

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.terminate()  # saves its persistence file
            self.p.wait(10)


# ------------------------------------------------------------------ main

SEQ_RULE = """// Every simulator reading gets the next number: a gap-free sequence
// made inside the gateway, checked at the cloud end.
fn on_reading(r) {
  if r.device == "seq" {
    let n = (state.n ?? 0) + 1;
    state.n = n;
    publish("soak/seq", n.to_string(), #{qos: 1});
  }
}
"""
GOOD_VICTIM = """fn on_reading(r) {
  if r.device == "tcp1" && r.point == "temp" { publish("soak/temp", r.value.to_string()); }
}
"""
BAD_VICTIM = """fn on_reading(r) {
  loop { }
}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--duration", type=int, default=180, help="seconds of fault injection")
    ap.add_argument("--out", default=None, help="keep logs and results here")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="measure memory from the start, while the broker's logs still fill")
    ap.add_argument("--no-metrics", action="store_true",
                    help="for a gateway built without metrics (driver debugging only)")
    a = ap.parse_args()

    d = tempfile.mkdtemp(prefix="edgebridge-soak-")
    out_dir = a.out or d
    os.makedirs(out_dir, exist_ok=True)
    ports = dict(local=free_port(), metrics=free_port(), cloud=free_port(), tcp=free_port())
    os.makedirs(f"{d}/rules")
    with open(f"{d}/rules/seq.rhai", "w") as f:
        f.write(SEQ_RULE)
    with open(f"{d}/rules/victim.rhai", "w") as f:
        f.write(GOOD_VICTIM)

    mosq = Mosquitto(d, ports["cloud"])
    mosq.start()
    cloud_log = open(f"{out_dir}/cloud.txt", "w")
    # A persistent session: what arrives while Mosquitto is down is queued
    # on the gateway side, what arrives while this subscriber reconnects is
    # kept by Mosquitto.
    sub_cmd = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(ports["cloud"]), "-q", "1",
               "-c", "-i", "soak-cloud", "-t", "site/#", "-v"]
    cloud_sub = subprocess.Popen(sub_cmd, stdout=cloud_log, stderr=subprocess.DEVNULL)

    rtu = RtuBus(f"{d}/ttyRTU")
    tcp = TcpDevice(ports["tcp"])
    config = f"""gateway: {{ id: soak, data_dir: {d}/data }}
broker:
  listeners:
    - {{ bind: "127.0.0.1:{ports['local']}", protocol: mqtt }}
{'' if a.no_metrics else f'metrics: {{ bind: "127.0.0.1:{ports["metrics"]}" }}'}
devices:
  - name: rtu1
    driver: modbus-rtu
    port: {d}/ttyRTU
    baud: 38400
    slave: 1
    poll: 500ms
    timeout: 200ms
    points:
      - {{ name: count, table: holding, address: 0, type: u16 }}
      - {{ name: temp, table: holding, address: 1, type: i16, scale: 0.1 }}
  - name: rtu2
    driver: modbus-rtu
    port: {d}/ttyRTU
    baud: 38400
    slave: 2
    poll: 500ms
    timeout: 200ms
    points:
      - {{ name: count, table: input, address: 0, type: u16 }}
  - name: tcp1
    driver: modbus-tcp
    address: "127.0.0.1:{ports['tcp']}"
    slave: 1
    poll: 500ms
    timeout: 300ms
    points:
      - {{ name: count, table: holding, address: 0, type: u16 }}
      - {{ name: temp, table: holding, address: 1, type: i16, scale: 0.1 }}
  - name: seq
    driver: simulator
    poll: 100ms
    points:
      - {{ name: tick, wave: sine }}
mappings:
  - {{ match: "*/*", topic: "devices/{{device}}/{{point}}", payload: json }}
rules: {{ dir: {d}/rules }}
bridges:
  - name: cloud
    url: mqtt://127.0.0.1:{ports['cloud']}
    client_id: soak-gw
    forward:
      - {{ topics: "soak/#", remote_prefix: "site/", qos: 1 }}
      - {{ topics: "devices/#", remote_prefix: "site/", qos: 0 }}
    reconnect: {{ min: 500ms, max: 5s }}
"""
    with open(f"{d}/config.yaml", "w") as f:
        f.write(config)
    gw_log = open(f"{out_dir}/gateway.log", "w")
    env = dict(os.environ, EDGEBRIDGE_LOG="info,rmqtt=warn")
    # As under systemd: a panic backtrace would make a debug binary load
    # ~170 MiB of debug info and hide the real memory curve.
    env.pop("RUST_BACKTRACE", None)
    gw = subprocess.Popen([os.path.abspath(a.binary), "run", "--config", f"{d}/config.yaml"],
                          cwd=d, stdout=gw_log, stderr=subprocess.STDOUT, env=env)
    wait_port(ports["local"])
    if not a.no_metrics:
        wait_port(ports["metrics"])
    log(f"gateway pid {gw.pid}, work dir {d}")

    # A reliable local witness of every sequence number the gateway made.
    local_log = open(f"{out_dir}/local.txt", "w")
    local_sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(ports["local"]),
                                  "-q", "1", "-i", "soak-local", "-t", "soak/seq"],
                                 stdout=local_log, stderr=subprocess.DEVNULL)
    churn = Churn(ports["local"])
    slow = SlowSubscriber(ports["local"])
    if not a.no_warm_up:
        warm_up(ports["local"])

    def hup():
        os.kill(gw.pid, signal.SIGHUP)

    def write_victim(text):
        with open(f"{d}/rules/victim.rhai", "w") as f:
            f.write(text)
        hup()

    faults = [
        ("rtu_silent", lambda: setattr(rtu, "mode", "silent"), lambda: setattr(rtu, "mode", "ok")),
        ("tcp_silent", lambda: setattr(tcp, "mode", "silent"), lambda: setattr(tcp, "mode", "ok")),
        ("rtu_garbage", lambda: setattr(rtu, "mode", "garbage"), lambda: setattr(rtu, "mode", "ok")),
        ("serial_vanishes", rtu.vanish, rtu.come_back),
        ("mosquitto_down", mosq.stop, mosq.start),
        ("rule_infinite_loop", lambda: write_victim(BAD_VICTIM), lambda: write_victim(GOOD_VICTIM)),
        ("client_churn", lambda: setattr(churn, "active", True), lambda: setattr(churn, "active", False)),
        ("slow_subscriber", lambda: setattr(slow, "active", True), lambda: setattr(slow, "active", False)),
    ]
    samples = []
    m_start = metrics(ports["metrics"])
    rss0, fds0, start0 = proc_sample(gw.pid)
    log(f"start: rss {rss0} KiB, fds {fds0}")
    t_end = time.time() + a.duration
    slot = max(10.0, a.duration / (len(faults) + 1))
    injected = []
    during = {}  # metrics in the middle of each fault
    i = 0
    try:
        while time.time() < t_end:
            name, on, off = faults[i % len(faults)]
            i += 1
            log(f"fault: {name} for {slot / 2:.0f}s")
            t0 = time.time()
            on()
            injected.append(name)
            while time.time() < t0 + slot / 2:
                time.sleep(1)
                samples.append((time.time(), *proc_sample(gw.pid)))
                if time.time() > t0 + slot / 4 and name not in during:
                    during[name] = metrics(ports["metrics"])
            off()
            log(f"fault over: {name}")
            while time.time() < min(t0 + slot, t_end):
                time.sleep(1)
                samples.append((time.time(), *proc_sample(gw.pid)))
        log("faults done; letting the bridge drain")
        deadline = time.time() + 60
        while time.time() < deadline:
            m = metrics(ports["metrics"])
            if msum(m, "edgebridge_bridge_queue_messages") == 0 and msum(m, "edgebridge_bridge_connected") >= 1:
                break
            time.sleep(1)
        time.sleep(3)
        m_end = metrics(ports["metrics"])
        # Local clients must still get in at the end (the old rumqttd
        # engine could poison a listener: see SOAK.md).
        try:
            mqtt_connect(ports["local"], "soak-final-check").close()
            final_connect = "ok"
        except (OSError, RuntimeError) as e:
            final_connect = f"failed: {e}"
        rss1, fds1, start1 = proc_sample(gw.pid)
        alive = gw.poll() is None
    finally:
        if gw.poll() is None:
            gw.send_signal(signal.SIGTERM)
            try:
                gw.wait(15)
            except subprocess.TimeoutExpired:
                gw.kill()
        for p in (local_sub, cloud_sub):
            p.terminate()
        mosq.stop()
        rtu.stop = True
    gw_log.close()
    cloud_log.close()
    local_log.close()

    # ---------------------------------------------------------- checks
    local = [int(x) for x in open(f"{out_dir}/local.txt").read().split() if x.isdigit()]
    cloud = set()
    for line in open(f"{out_dir}/cloud.txt"):
        if line.startswith("site/soak/seq "):
            v = line.split(" ", 1)[1].strip()
            if v.isdigit():
                cloud.add(int(v))
    n_made = max(local) if local else 0
    missing = sorted(set(range(1, n_made + 1)) - cloud)
    logtext = open(f"{out_dir}/gateway.log").read()
    third = max(1, len(samples) // 3)
    early = sorted(s[1] for s in samples[:third])
    late = sorted(s[1] for s in samples[-third:])
    rss_early = early[len(early) // 2] if early else rss0
    rss_late = late[len(late) // 2] if late else rss1
    fds_max_late = max((s[2] for s in samples[-third:]), default=fds1)

    def delta(name, **labels):
        return msum(m_end, name, **labels) - msum(m_start, name, **labels)

    checks = []

    def check(name, ok, detail):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    check("gateway never restarted", alive and start0 == start1 and "panicked" not in logtext,
          f"alive={alive}, same process start time={start0 == start1}, "
          f"panics in the log: {logtext.count('panicked at')}")
    check("a new local client can still connect", final_connect == "ok", final_connect)
    check("every sequence number reached the cloud", n_made > 0 and not missing,
          f"{n_made} made, {len(cloud)} distinct at the cloud, missing {missing[:20]}{'...' if len(missing) > 20 else ''}")
    check("memory did not grow", rss_late <= rss_early * 1.25 + 8192,
          f"RSS median first third {rss_early} KiB, last third {rss_late} KiB (start {rss0}, end {rss1})")
    check("file descriptors did not grow", fds1 <= fds0 + 4 and fds_max_late <= fds0 + 8,
          f"fds start {fds0}, end {fds1}, max in last third {fds_max_late}")
    expect = {
        "rtu_silent": ("device timeouts", delta("edgebridge_device_timeouts_total", device="rtu1") > 0,
                       r"rtu1.*(offline|timed out|no answer)|(offline|no answer).*rtu1"),
        "tcp_silent": ("device timeouts", delta("edgebridge_device_timeouts_total", device="tcp1") > 0,
                       r"tcp1.*(offline|no answer)|(offline|no answer).*tcp1"),
        "rtu_garbage": ("device errors", delta("edgebridge_device_errors_total", device="rtu1")
                        + delta("edgebridge_device_timeouts_total", device="rtu1") > 0,
                        r"(garbled|CRC|invalid|protocol)"),
        "serial_vanishes": ("device errors", delta("edgebridge_device_errors_total", device="rtu2")
                            + delta("edgebridge_device_timeouts_total", device="rtu2") > 0,
                            r"(lost|cannot open|No such file|not found)"),
        "mosquitto_down": ("bridge disconnected and queueing",
                           msum(during.get("mosquitto_down", {}), "edgebridge_bridge_connected") == 0
                           and msum(during.get("mosquitto_down", {}), "edgebridge_bridge_queue_messages") > 0,
                           r"(?i)bridge.*(disconnect|connection|refused|lost)"),
        "rule_infinite_loop": ("rule errors", delta("edgebridge_rule_errors_total") > 0,
                               r"(?i)(deadline|too long|terminated|operations)"),
        "client_churn": ("churn connections", churn.done > 0, None),
        "slow_subscriber": ("slow subscriber served", True, None),
    }
    for name in dict.fromkeys(injected):
        what, in_metrics, pattern = expect[name]
        in_logs = True if pattern is None else re.search(pattern, logtext) is not None
        check(f"fault `{name}` visible", in_metrics and in_logs,
              f"{what} in metrics: {in_metrics}; in logs: {in_logs}")
    summary = {
        "duration_s": a.duration,
        "faults": injected,
        "sequence": {"made": n_made, "at_cloud": len(cloud), "missing": len(missing)},
        "rss_kib": {"start": rss0, "early_median": rss_early, "late_median": rss_late, "end": rss1},
        "fds": {"start": fds0, "end": fds1},
        "churn": {"connections": churn.done, "failed": churn.failed},
        "metrics_delta": {k: delta(k) for k in [
            "edgebridge_device_timeouts_total", "edgebridge_device_errors_total",
            "edgebridge_rule_errors_total", "edgebridge_bridge_redelivered_total",
            "edgebridge_bridge_dropped_total", "edgebridge_config_reloads_total",
            "edgebridge_readings_total", "edgebridge_bridge_forwarded_total"]},
        "checks": checks,
        "samples": [{"t": round(t - samples[0][0], 1), "rss_kib": r, "fds": f} for t, r, f, _ in samples[::5]] if samples else [],
        "panics_in_log": logtext.count("panicked at"),
    }
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump(summary, f, indent=2)
    for c in checks:
        log(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}: {c['detail']}")
    passed = sum(c["ok"] for c in checks)
    print(f"soak: {passed} passed, {len(checks) - passed} failed")
    if a.out is None:
        log(f"logs kept in {d}")
    return 0 if passed == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
