"""Concurrent relayed G.711 calls with zero loss: the switch's RTP relay, and rtpengine
(userspace) as the reference, fed by the same load generator.

A step sets up N calls through the switch (SIPp caller ``sipp/uac_relay_call.xml`` with
digest, SIPp callee ``sipp/uas_relay_answer.xml``; media relay on), then the generator
sends PCMU RTP, 50 packets/s in each direction of every call (172-byte packets: 12 of
header, 160 of payload) for a few seconds through the relay ports the SDP gave, and
counts what arrives at the far ends. The first 8 payload bytes carry the send time
(CLOCK_MONOTONIC, ns): the receiver's time minus it is the packet's one-way latency. The
same generator run with each socket sending straight to its peer (no relay) is the
baseline: latency added by the relay = relay run − baseline run, per percentile.

The generator is this module run as a program (``python -m tests.bench.relay generate
SPEC OUT``): one process sends on a fixed schedule (each stream in its own 1 ms slot of
the 20 ms packet interval) while a forked child receives with uvloop on the same sockets.
"""

from __future__ import annotations

import array
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .calls import (
    caller_row,
    register_contacts,
    start_callee,
    stop_process,
    udp_port_bound,
    write_call_injection,
)
from .configs import device_password, switch_config_text
from .procs import (
    LOOPBACK,
    REPO_ROOT,
    BenchError,
    SwitchProcess,
    cpu_seconds,
    free_udp_port,
)
from .register import _log_errors
from .sipp import SCENARIO_DIR, SOCKET_BUFFER, _udp_rcvbuf_errors

CALLER_SCENARIO = SCENARIO_DIR / "uac_relay_call.xml"
CALLEE_SCENARIO = SCENARIO_DIR / "uas_relay_answer.xml"

PACKETS_PER_SECOND = 50  # 20 ms of G.711 per packet
RTP_HEADER_BYTES = 12
PCMU_PAYLOAD_BYTES = 160
PACKET_BYTES = RTP_HEADER_BYTES + PCMU_PAYLOAD_BYTES  # 172
SLOTS_PER_INTERVAL = 20  # streams are spread over 1 ms slots of the 20 ms interval
# the generator's sockets: outside the ephemeral range (32768-60999), so SIPp, the
# switch's own sockets and free_udp_port() never take them
CALLER_PORT_BASE = 61000
CALLEE_PORT_BASE = 63000
MAX_CALLS = 2000
# the relay's port range (4 ports per call: RTP and RTCP on each side)
RELAY_PORT_MIN = 20000
RELAY_PORT_MAX = 29999
# callees per generated account (an account holds at most 1,000 devices; one is the caller)
CALLEES_PER_ACCOUNT = 999
CALLER_EXTENSION = "100"
# the generator is behind schedule when its sending took this much longer than planned
SCHEDULE_TOLERANCE = 0.05
DRAIN_S = 1.0
PCT = (0.5, 0.9, 0.99, 0.999)


@dataclass
class RelayPlan:
    """Call counts and durations of the relay ramp (``--quick`` shrinks them)."""

    steps: list[int]
    rtp_seconds: float
    setup_rate: int
    pause_between_steps_s: float
    retries_of_lossy_step: int = 1

    @classmethod
    def full(cls) -> RelayPlan:
        return cls(steps=[100, 250, 500, 750, 1000, 1250, 1500, 2000], rtp_seconds=10.0,
                   setup_rate=200, pause_between_steps_s=3.0)

    @classmethod
    def quick(cls) -> RelayPlan:
        return cls(steps=[50, 100, 250, 500], rtp_seconds=4.0, setup_rate=200,
                   pause_between_steps_s=2.0)

    def criteria(self) -> dict:
        return {
            "rtp_seconds": self.rtp_seconds,
            "packets": (
                f"PCMU, {PACKET_BYTES} bytes, {PACKETS_PER_SECOND}/s in each direction of "
                "every call"
            ),
            "clean": (
                "every call set up, 0 packets lost or misrouted in both directions, and the "
                f"generator on schedule (sending took <= {100 * SCHEDULE_TOLERANCE:.0f}% "
                "longer than planned)"
            ),
            "stop": (
                f"at the first step with loss {1 + self.retries_of_lossy_step} times in a "
                "row, or where the generator cannot keep its schedule"
            ),
            "latency": (
                "one-way, send time in the payload vs receive time (CLOCK_MONOTONIC); added "
                "= relay run - direct run of the same generator with the same N, per "
                "percentile"
            ),
            "call_setup_rate": self.setup_rate,
        }


@dataclass
class Endpoint:
    """One generator socket: the port it is bound to, where it sends, the SSRC it
    sends with and the SSRC it expects to receive."""

    port: int
    send_to: int
    ssrc: int
    peer_ssrc: int


def call_endpoints(
    calls: int, send_to_caller_side: list[int], send_to_callee_side: list[int]
) -> list[Endpoint]:
    """Two endpoints per call i: caller side (even index) and callee side (odd)."""
    endpoints: list[Endpoint] = []
    for index in range(calls):
        endpoints.append(Endpoint(CALLER_PORT_BASE + index, send_to_caller_side[index],
                                  2 * index, 2 * index + 1))
        endpoints.append(Endpoint(CALLEE_PORT_BASE + index, send_to_callee_side[index],
                                  2 * index + 1, 2 * index))
    return endpoints


def direct_endpoints(calls: int) -> list[Endpoint]:
    """The baseline: each side sends straight to the other's socket."""
    return call_endpoints(
        calls, [CALLEE_PORT_BASE + i for i in range(calls)],
        [CALLER_PORT_BASE + i for i in range(calls)],
    )


# --------------------------------------------------------------------------------------
# The generator (runs as its own process)
# --------------------------------------------------------------------------------------

_SEND_FIELDS = struct.Struct("!HIIq")  # at offset 2: sequence, timestamp, SSRC, send time
_RECEIVE_FIELDS = struct.Struct("!Iq")  # at offset 8: SSRC, send time


def percentiles_us(latencies_ns: array.array) -> dict:
    """p50/p90/p99/p99.9/max of latencies in ns, as µs; {} when there are none."""
    if not latencies_ns:
        return {}
    ordered = sorted(latencies_ns)
    count = len(ordered)
    result = {f"p{q * 100:g}": round(ordered[min(count - 1, int(q * count))] / 1000, 1)
              for q in PCT}
    result["max"] = round(ordered[-1] / 1000, 1)
    result["samples"] = count
    return result


def _receive(sockets: list[socket.socket], endpoints: list[dict], ready_fd: int,
             done_fd: int, out_path: str, safety_s: float) -> int:
    """The receiving child: one uvloop datagram endpoint per socket; stops DRAIN_S after
    the sender writes to ``done_fd``. Writes counts and latency percentiles as JSON."""
    import asyncio

    try:
        import uvloop

        loop = uvloop.new_event_loop()
        loop_name = "uvloop"
    except ImportError:
        loop = asyncio.new_event_loop()
        loop_name = "asyncio"
    latencies = array.array("q")
    append = latencies.append
    clock = time.monotonic_ns
    unpack = _RECEIVE_FIELDS.unpack_from

    class Receiver(asyncio.DatagramProtocol):
        __slots__ = ("expect", "received", "misrouted")

        def __init__(self, expect: int) -> None:
            self.expect = expect
            self.received = 0
            self.misrouted = 0

        def datagram_received(self, data: bytes, addr) -> None:
            now = clock()
            if len(data) != PACKET_BYTES:
                self.misrouted += 1
                return
            ssrc, sent = unpack(data, 8)
            if ssrc != self.expect:
                self.misrouted += 1
                return
            self.received += 1
            append(now - sent)

        def error_received(self, exc: Exception) -> None:  # ICMP port unreachable etc.
            pass

    receivers = [Receiver(endpoint["peer_ssrc"]) for endpoint in endpoints]

    async def open_all() -> None:
        for sock, receiver in zip(sockets, receivers, strict=True):
            await loop.create_datagram_endpoint(lambda r=receiver: r, sock=sock)

    loop.run_until_complete(open_all())

    def sender_done() -> None:
        loop.remove_reader(done_fd)
        loop.call_later(DRAIN_S, loop.stop)

    loop.add_reader(done_fd, sender_done)
    loop.call_later(safety_s, loop.stop)
    os.write(ready_fd, b"r")
    loop.run_forever()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    caller_side = receivers[0::2]  # receive what the callees send
    callee_side = receivers[1::2]
    result = {
        "loop": loop_name,
        "received_by_callers": sum(r.received for r in caller_side),
        "received_by_callees": sum(r.received for r in callee_side),
        "misrouted": sum(r.misrouted for r in receivers),
        "latency_us": percentiles_us(latencies),
        "receiver_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
    }
    with open(out_path, "w") as out:
        json.dump(result, out)
    return 0


def _send(sockets: list[socket.socket], endpoints: list[dict], host: str, seconds: float,
          rate: int) -> dict:
    """Send ``rate`` packets/s on every socket for ``seconds``, each stream in its slot."""
    interval = 1.0 / rate
    slot_gap = interval / SLOTS_PER_INTERVAL
    groups: list[list[tuple]] = [[] for _ in range(SLOTS_PER_INTERVAL)]
    for index, (sock, endpoint) in enumerate(zip(sockets, endpoints, strict=True)):
        packet = bytearray(b"\xff" * PACKET_BYTES)
        packet[0], packet[1] = 0x80, 0  # RTP version 2, payload type 0 (PCMU)
        groups[index % SLOTS_PER_INTERVAL].append(
            (sock.sendto, packet, endpoint["ssrc"], (host, endpoint["send_to"]))
        )
    packets = int(round(rate * seconds))
    pack = _SEND_FIELDS.pack_into
    clock_ns = time.monotonic_ns
    send_errors = 0
    max_lag = 0.0
    start = time.monotonic() + 0.05
    for seq in range(packets):
        base = start + seq * interval
        timestamp = (seq * PCMU_PAYLOAD_BYTES) & 0xFFFFFFFF
        sequence = seq & 0xFFFF
        for slot in range(SLOTS_PER_INTERVAL):
            delay = base + slot * slot_gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif -delay > max_lag:
                max_lag = -delay
            for sendto, packet, ssrc, destination in groups[slot]:
                pack(packet, 2, sequence, timestamp, ssrc, clock_ns())
                try:
                    sendto(packet, destination)
                except OSError:
                    send_errors += 1
    elapsed = time.monotonic() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    planned = packets * interval
    return {
        "packets_per_stream": packets,
        "sent": packets * len(sockets) - send_errors,
        "send_errors": send_errors,
        "send_seconds": round(elapsed, 3),
        "planned_seconds": round(planned, 3),
        "max_lag_ms": round(1000 * max_lag, 2),
        "on_schedule": elapsed <= planned * (1 + SCHEDULE_TOLERANCE) + slot_gap,
        "sender_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
    }


def generate(spec: dict, out_path: str) -> int:
    """Bind every endpoint's socket, fork the receiver, send, gather both halves."""
    host = spec["host"]
    endpoints = spec["endpoints"]
    sockets: list[socket.socket] = []
    try:
        for endpoint in endpoints:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.bind((host, endpoint["port"]))
    except OSError as error:
        print(f"generator: cannot bind {host}:{endpoint['port']}: {error}", file=sys.stderr)
        return 3
    ready_read, ready_write = os.pipe()
    done_read, done_write = os.pipe()
    receive_path = out_path + ".receive.json"
    safety_s = spec["seconds"] * 3 + 30
    child = os.fork()
    if child == 0:  # the receiver
        code = 1
        try:
            os.close(ready_read)
            os.close(done_write)
            code = _receive(sockets, endpoints, ready_write, done_read, receive_path, safety_s)
        finally:
            os._exit(code)
    os.close(ready_write)
    os.close(done_read)
    poller = select.poll()  # not select(): the descriptors go past 1024
    poller.register(ready_read, select.POLLIN)
    if not poller.poll(30_000):
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        print("generator: the receiver did not start", file=sys.stderr)
        return 4
    sent = _send(sockets, endpoints, host, spec["seconds"], spec["rate"])
    os.write(done_write, b"d")
    deadline = time.monotonic() + DRAIN_S + 60
    status = None
    while time.monotonic() < deadline:
        finished, status = os.waitpid(child, os.WNOHANG)
        if finished == child:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        print("generator: the receiver did not finish", file=sys.stderr)
        return 5
    try:
        with open(receive_path) as received_file:
            received = json.load(received_file)
    except (OSError, ValueError):
        print(f"generator: the receiver wrote no result (status {status})", file=sys.stderr)
        return 6
    result = sent | received
    result["calls"] = len(endpoints) // 2
    per_direction = sent["packets_per_stream"] * result["calls"]
    result["expected_per_direction"] = per_direction
    result["lost_caller_to_callee"] = per_direction - received["received_by_callees"]
    result["lost_callee_to_caller"] = per_direction - received["received_by_callers"]
    result["received"] = received["received_by_callees"] + received["received_by_callers"]
    result["lost"] = 2 * per_direction - result["received"]
    with open(out_path, "w") as out:
        json.dump(result, out)
    return 0


def _generator_main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "generate":
        print("usage: python -m tests.bench.relay generate SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[1]) as spec_file:
        spec = json.load(spec_file)
    return generate(spec, argv[2])


# --------------------------------------------------------------------------------------
# Running the generator from the harness
# --------------------------------------------------------------------------------------


@dataclass
class GeneratorRun:
    result: dict
    wall_s: float
    target_cpu_s: float
    udp_rcvbuf_errors: int


def run_generator(endpoints: list[Endpoint], seconds: float, workdir: Path, name: str,
                  watch: list[int]) -> GeneratorRun:
    """One bounded generator process; the CPU of ``watch`` is read around it."""
    spec_path = workdir / f"{name}.spec.json"
    out_path = workdir / f"{name}.out.json"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({
        "host": LOOPBACK, "rate": PACKETS_PER_SECOND, "seconds": seconds,
        "endpoints": [endpoint.__dict__ for endpoint in endpoints],
    }))
    env = dict(os.environ)
    existing = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{existing}" if existing else str(REPO_ROOT)
    command = [sys.executable, "-m", "tests.bench.relay", "generate", str(spec_path),
               str(out_path)]
    cpu_before = {pid: cpu_seconds(pid) for pid in watch}
    drops_before = _udp_rcvbuf_errors()
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=3 * seconds + 120)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the RTP generator ({name}) hung and was stopped") from None
    finally:
        if process.poll() is None:  # hung, or the harness was interrupted
            stop_process(process)
    wall = time.monotonic() - started
    target_cpu = sum(cpu_seconds(pid) - cpu_before[pid] for pid in watch)
    drops = _udp_rcvbuf_errors() - drops_before
    if process.returncode != 0 or not out_path.exists():
        raise BenchError(f"the RTP generator ({name}) failed with {process.returncode}: "
                         f"{output.decode(errors='replace')[-800:]}")
    return GeneratorRun(json.loads(out_path.read_text()), wall, target_cpu, drops)


@dataclass
class RelayStep:
    """One N of one relay: what was set up, sent, received, and the latencies."""

    label: str
    calls: int
    calls_set_up: int = 0
    sent: int = 0
    received: int = 0
    lost: int = 0
    lost_caller_to_callee: int = 0
    lost_callee_to_caller: int = 0
    misrouted: int = 0
    send_errors: int = 0
    relayed_packets_per_s: float = 0.0
    relay_cpu_percent: float = 0.0
    relay_cpu_us_per_packet: float | None = None
    generator_cpu_percent: float = 0.0
    generator_on_schedule: bool = True
    generator_max_lag_ms: float = 0.0
    udp_rcvbuf_errors: int = 0
    latency_us: dict = field(default_factory=dict)
    baseline_latency_us: dict = field(default_factory=dict)
    added_latency_us: dict = field(default_factory=dict)
    zero_loss: bool = False
    clean: bool = False
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        state = "clean" if self.clean else "NOT clean: " + "; ".join(self.problems)
        added = self.added_latency_us
        return (
            f"[{self.label}] {self.calls_set_up}/{self.calls} calls, sent {self.sent} "
            f"received {self.received} lost {self.lost} ({self.relayed_packets_per_s:,.0f} "
            f"pkt/s) relay_cpu={self.relay_cpu_percent:.0f}% "
            f"gen_cpu={self.generator_cpu_percent:.0f}% added p50/p99="
            f"{added.get('p50', '?')}/{added.get('p99', '?')} µs -> {state}"
        )


def _fill_step(step: RelayStep, run: GeneratorRun, baseline: GeneratorRun | None) -> None:
    result = run.result
    step.sent = result["sent"]
    step.received = result["received"]
    step.lost = result["lost"]
    step.lost_caller_to_callee = result["lost_caller_to_callee"]
    step.lost_callee_to_caller = result["lost_callee_to_caller"]
    step.misrouted = result["misrouted"]
    step.send_errors = result["send_errors"]
    # the relay is idle before the first and after the last packet: CPU shares are of
    # the sending window
    window = max(result["send_seconds"], 1e-9)
    step.relayed_packets_per_s = round(step.received / window, 1)
    step.relay_cpu_percent = round(100.0 * run.target_cpu_s / window, 1)
    if step.received:
        step.relay_cpu_us_per_packet = round(1e6 * run.target_cpu_s / step.received, 2)
    step.generator_cpu_percent = round(
        100.0 * (result["sender_cpu_s"] + result["receiver_cpu_s"]) / window, 1)
    step.generator_on_schedule = bool(result["on_schedule"])
    step.generator_max_lag_ms = result["max_lag_ms"]
    step.udp_rcvbuf_errors = run.udp_rcvbuf_errors
    step.latency_us = result["latency_us"]
    if baseline is not None:
        step.baseline_latency_us = baseline.result["latency_us"]
        step.added_latency_us = {
            key: round(step.latency_us[key] - step.baseline_latency_us[key], 1)
            for key in ("p50", "p90", "p99", "p99.9")
            if key in step.latency_us and key in step.baseline_latency_us
        }
    step.zero_loss = step.lost == 0 and step.misrouted == 0 and step.send_errors == 0
    if step.lost:
        step.problems.append(
            f"{step.lost} lost ({step.lost_caller_to_callee} caller→callee, "
            f"{step.lost_callee_to_caller} callee→caller)")
    if step.misrouted:
        step.problems.append(f"{step.misrouted} misrouted")
    if step.send_errors:
        step.problems.append(f"{step.send_errors} send errors")
    if not step.generator_on_schedule:
        step.problems.append(
            f"generator behind schedule ({result['send_seconds']:.1f} s for "
            f"{result['planned_seconds']:.1f} s)")
    if baseline is not None and baseline.result["lost"]:
        step.problems.append(f"{baseline.result['lost']} lost without the relay")
    step.clean = not step.problems


# --------------------------------------------------------------------------------------
# The ramp (shared by both relays)
# --------------------------------------------------------------------------------------


def _ramp(plan: RelayPlan, label: str, run_step, baselines: dict[int, GeneratorRun],
          workdir: Path) -> dict:
    """``run_step(calls) -> RelayStep`` for each N; the first step that loses packets
    (again on retry) or outruns the generator ends the ramp."""
    steps: list[dict] = []
    best: RelayStep | None = None
    stopped_by = "last step reached"
    for index, calls in enumerate(plan.steps):
        if calls > MAX_CALLS:
            break
        if index:
            time.sleep(plan.pause_between_steps_s)
        attempts: list[RelayStep] = []
        try:
            if calls not in baselines:
                baselines[calls] = run_generator(direct_endpoints(calls), plan.rtp_seconds,
                                                 workdir, f"baseline-{calls}", [])
                time.sleep(1.0)
            for attempt in range(1 + plan.retries_of_lossy_step):
                if attempt:
                    time.sleep(plan.pause_between_steps_s)
                step = run_step(calls, attempt)
                print("bench:", step.summary(), flush=True)
                attempts.append(step)
                # only loss is worth a retry: a generator that cannot keep up will not now
                if step.clean or not step.generator_on_schedule:
                    break
        except BenchError as error:  # the steps so far stand
            print(f"bench: {label} {calls} calls: {error}", flush=True)
            stopped_by = f"error at {calls} calls: {str(error)[:300]}"
            break
        record = step.__dict__ | {"earlier_attempts": [a.__dict__ for a in attempts[:-1]]}
        steps.append(record)
        if not step.clean:
            stopped_by = ("the generator could not keep its schedule"
                          if not step.generator_on_schedule and step.zero_loss
                          else "; ".join(step.problems))
            break
        best = step
    return {
        "steps": steps,
        "max_zero_loss_calls": best.calls if best else 0,
        "packets_per_second_at_max": best.relayed_packets_per_s if best else 0,
        "cpu_percent_at_max": best.relay_cpu_percent if best else None,
        "cpu_us_per_packet_at_max": best.relay_cpu_us_per_packet if best else None,
        "latency_us_at_max": best.latency_us if best else {},
        "baseline_latency_us_at_max": best.baseline_latency_us if best else {},
        "added_latency_us_at_max": best.added_latency_us if best else {},
        "stopped_by": stopped_by,
        "lower_bound": stopped_by.startswith(("the generator", "last", "error")),
    }


# --------------------------------------------------------------------------------------
# 1. the switch's relay
# --------------------------------------------------------------------------------------


def callee_username(calls_index: int) -> str:
    return f"b{CALLEE_PORT_BASE + calls_index}"


def caller_username(account_index: int) -> str:
    return f"a{account_index + 1:03d}"


# the devices are desk phones at the emergency site of switch_config_text (a device with
# no location cannot place ordinary calls once sites are configured)
_AT_SITE = "kind: desk_phone, site: hq, location: floor1"


def relay_config_text(port: int, calls: int) -> str:
    """Accounts of one caller and up to 999 callees each (callee extension = the port of
    its generator socket), the built-in relay with a range for every call, no media
    timeout."""
    lines = [switch_config_text(port=port, accounts=0, devices_per_account=0).rstrip("\n")]
    accounts = math.ceil(calls / CALLEES_PER_ACCOUNT)
    for account in range(accounts):
        caller = caller_username(account)
        lines += [f"  - id: relay{account + 1:03d}", "    devices:",
                  f'      - {{extension: "{CALLER_EXTENSION}", username: "{caller}", '
                  f'password: "{device_password(caller)}", {_AT_SITE}}}']
        first = account * CALLEES_PER_ACCOUNT
        for index in range(first, min(calls, first + CALLEES_PER_ACCOUNT)):
            user = callee_username(index)
            lines.append(f'      - {{extension: "{CALLEE_PORT_BASE + index}", '
                         f'username: "{user}", password: "{device_password(user)}", '
                         f'{_AT_SITE}}}')
    lines += [
        "media:",
        f"  {{backend: relay, bind_host: {LOOPBACK}, port_min: {RELAY_PORT_MIN}, "
        f"port_max: {RELAY_PORT_MAX}, media_timeout: 0}}",
        "calls: {no_answer_timeout: 60, session_expires: 1800}",
        "fair_use: {enabled: false}  # one caller per account with hundreds of calls up",
    ]
    return "\n".join(lines) + "\n"


_RELAY_A = re.compile(r"^(\d+) m=audio (\d+)$")
_RELAY_B = re.compile(r"^INVITE sip:(\d+)@ m=audio (\d+)$")


def _read_ports(path: Path, pattern: re.Pattern) -> dict[int, int]:
    """generator port -> relay port, from the lines a SIPp scenario appended."""
    ports: dict[int, int] = {}
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ports
    for line in text.splitlines():
        match = pattern.match(line.strip())
        if match:
            ports[int(match.group(1))] = int(match.group(2))
    return ports


def switch_relay_step(plan: RelayPlan, workdir: Path, calls: int, attempt: int,
                      baseline: GeneratorRun) -> RelayStep:
    step = RelayStep(label=f"switch {calls} calls" + (f" (retry {attempt})" if attempt else ""),
                     calls=calls)
    stepdir = workdir / f"relay-switch-{calls}-{attempt}"
    stepdir.mkdir(parents=True, exist_ok=True)
    port, callee_port = free_udp_port(), free_udp_port()
    config = stepdir / "switch.yaml"
    config.write_text(relay_config_text(port, calls))
    target = f"{LOOPBACK}:{port}"
    switch = SwitchProcess(config, stepdir / "switch.log", port)
    switch.start(ready_timeout=120)
    setup_seconds = calls / plan.setup_rate
    wait_budget = setup_seconds + 30
    hold_ms = int(1000 * (wait_budget + plan.rtp_seconds + DRAIN_S + 15))
    callee = caller = None
    try:
        register_contacts(
            target=target, contact_port=callee_port, workdir=stepdir,
            rows=[caller_row(callee_username(i), device_password(callee_username(i)),
                             str(CALLEE_PORT_BASE + i)) for i in range(calls)],
        )
        injection = stepdir / "callers.csv"
        write_call_injection(injection, [
            caller_row(caller_username(i // CALLEES_PER_ACCOUNT),
                       device_password(caller_username(i // CALLEES_PER_ACCOUNT)),
                       str(CALLEE_PORT_BASE + i), str(CALLER_PORT_BASE + i))
            for i in range(calls)
        ])
        sipp_wall = int(hold_ms / 1000 + wait_budget + 60)
        callee = start_callee(scenario=CALLEE_SCENARIO, port=callee_port, calls=calls,
                              workdir=stepdir, stats_path=None, wall_limit=sipp_wall)
        caller = subprocess.Popen(
            ["sipp", target, "-sf", str(CALLER_SCENARIO), "-inf", str(injection),
             "-i", LOOPBACK, "-p", str(free_udp_port()), "-cp", str(free_udp_port()),
             "-mp", str(free_udp_port()), "-m", str(calls), "-r", str(plan.setup_rate),
             "-l", str(calls + 10), "-d", str(hold_ms), "-default_behaviors", "-abortunexp",
             "-buff_size", str(SOCKET_BUFFER), "-timeout", str(sipp_wall), "-nostdin"],
            cwd=stepdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + wait_budget
        to_caller_side: dict[int, int] = {}
        to_callee_side: dict[int, int] = {}
        while time.monotonic() < deadline:
            to_caller_side = _read_ports(stepdir / "relay_a.txt", _RELAY_A)
            to_callee_side = _read_ports(stepdir / "relay_b.txt", _RELAY_B)
            if len(to_caller_side) >= calls and len(to_callee_side) >= calls:
                break
            if caller.poll() is not None or not switch.alive():
                break
            time.sleep(0.2)
        ready = [i for i in range(calls) if CALLER_PORT_BASE + i in to_caller_side
                 and CALLEE_PORT_BASE + i in to_callee_side]
        step.calls_set_up = len(ready)
        if len(ready) < calls:
            step.problems.append(f"only {len(ready)} of {calls} calls set up")
            return step
        time.sleep(0.5)  # the last ACKs
        run = run_generator(
            call_endpoints(calls, [to_caller_side[CALLER_PORT_BASE + i] for i in range(calls)],
                           [to_callee_side[CALLEE_PORT_BASE + i] for i in range(calls)]),
            plan.rtp_seconds, stepdir, "relay", [switch.pid],
        )
        _fill_step(step, run, baseline)
        if not switch.alive():
            step.problems.append("the switch died")
            step.clean = False
        return step
    finally:
        for process in (caller, callee):
            if process is not None:
                stop_process(process)
        switch.stop()
        errors = _log_errors(switch.log_path)
        if errors and not step.clean:
            step.problems.append("switch log: " + errors[0][:200])


def switch_relay(plan: RelayPlan, workdir: Path, baselines: dict[int, GeneratorRun]) -> dict:
    _check_generator_ports(max(plan.steps))

    def run_step(calls: int, attempt: int) -> RelayStep:
        return switch_relay_step(plan, workdir, calls, attempt, baselines[calls])

    result = _ramp(plan, "switch", run_step, baselines, workdir)
    result["server"] = ("softswitch (one process), built-in relay, calls set up with SIPp "
                        f"at {plan.setup_rate}/s")
    return result


def _check_generator_ports(calls: int) -> None:
    calls = min(calls, MAX_CALLS)
    for base in (CALLER_PORT_BASE, CALLEE_PORT_BASE):
        busy = [port for port in range(base, base + calls) if udp_port_bound(port)]
        if busy:
            raise BenchError(f"generator ports in use: {busy[:5]}... (another benchmark?)")


# --------------------------------------------------------------------------------------
# 2. rtpengine, the reference
# --------------------------------------------------------------------------------------


def rtpengine_binary() -> str | None:
    found = shutil.which("rtpengine")
    if found is None and os.access("/usr/sbin/rtpengine", os.X_OK):
        found = "/usr/sbin/rtpengine"
    return found


class NgControl:
    """A blocking ng client (bencode over UDP) for setting up the benchmark's calls."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(1.0)
        self.counter = 0

    def request(self, command: str, **arguments) -> dict:
        from media.bencode import decode, encode

        self.counter += 1
        # rtpengine answers a cookie it has seen with its cached reply: never reuse one
        cookie = f"b{os.urandom(4).hex()}_{self.counter}".encode()
        message = cookie + b" " + encode({"command": command, **arguments})
        for _ in range(3):
            self.sock.sendto(message, self.address)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                try:
                    data = self.sock.recv(65535)
                except TimeoutError:
                    break
                head, _, body = data.partition(b" ")
                if head == cookie:
                    reply = decode(body)
                    if not isinstance(reply, dict):
                        raise BenchError(f"rtpengine: bad reply to {command}")
                    return reply
        raise BenchError(f"rtpengine did not answer {command}")

    def close(self) -> None:
        self.sock.close()


def _sdp(port: int, session: int) -> str:
    return (f"v=0\r\no=- {session} 1 IN IP4 {LOOPBACK}\r\ns=-\r\nc=IN IP4 {LOOPBACK}\r\n"
            f"t=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")


def _sdp_port(reply: dict, command: str) -> int:
    if reply.get("result") != b"ok":
        raise BenchError(f"rtpengine {command}: {reply}")
    match = re.search(rb"^m=audio (\d+)", reply.get("sdp", b""), re.MULTILINE)
    if match is None:
        raise BenchError(f"rtpengine {command}: no m=audio in {reply}")
    return int(match.group(1))


@dataclass
class RtpengineProcess:
    """rtpengine in userspace (no kernel forwarding), one worker thread, on loopback."""

    binary: str
    run_dir: Path
    threads: int = 1
    ng_port: int = 0
    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ng_port = free_udp_port()
        command = [
            self.binary, "--config-file=none", "--foreground", "--log-stderr",
            "--log-level=4", "--table=-1", f"--interface={LOOPBACK}",
            f"--listen-ng={LOOPBACK}:{self.ng_port}", f"--port-min={RELAY_PORT_MIN}",
            f"--port-max={RELAY_PORT_MAX}", "--timeout=60", "--delete-delay=0",
            f"--num-threads={self.threads}",
        ]
        with open(self.run_dir / "rtpengine.log", "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.run_dir, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        control = NgControl((LOOPBACK, self.ng_port))
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                try:
                    if control.request("ping").get("result") == b"pong":
                        return
                except BenchError:
                    continue
        finally:
            control.close()
        self.stop()
        log_tail = (self.run_dir / "rtpengine.log").read_text(errors="replace")[-800:]
        raise BenchError(f"rtpengine did not answer ping: {log_tail}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def rtpengine_relay_step(plan: RelayPlan, workdir: Path, rtpengine: RtpengineProcess,
                         calls: int, attempt: int, baseline: GeneratorRun) -> RelayStep:
    step = RelayStep(label=f"rtpengine {calls} calls" + (f" (retry {attempt})" if attempt
                                                          else ""), calls=calls)
    control = NgControl((LOOPBACK, rtpengine.ng_port))
    call_ids = [f"bench-{calls}-{attempt}-{i}" for i in range(calls)]
    to_caller_side: list[int] = []
    to_callee_side: list[int] = []
    try:
        flags = {"replace": ["origin", "session-connection"], "ICE": "remove"}
        for index, call_id in enumerate(call_ids):
            offer = control.request("offer", **{
                "call-id": call_id, "from-tag": "caller",
                "sdp": _sdp(CALLER_PORT_BASE + index, 1000 + index), **flags})
            to_callee_side.append(_sdp_port(offer, "offer"))
            answer = control.request("answer", **{
                "call-id": call_id, "from-tag": "caller", "to-tag": "callee",
                "sdp": _sdp(CALLEE_PORT_BASE + index, 5000 + index), **flags})
            to_caller_side.append(_sdp_port(answer, "answer"))
        step.calls_set_up = calls
        run = run_generator(call_endpoints(calls, to_caller_side, to_callee_side),
                            plan.rtp_seconds, workdir, f"rtpengine-{calls}-{attempt}",
                            [rtpengine.pid])
        _fill_step(step, run, baseline)
        if not rtpengine.alive():
            step.problems.append("rtpengine died")
            step.clean = False
        return step
    finally:
        for call_id in call_ids:
            try:
                control.request("delete", **{"call-id": call_id})
            except BenchError:
                break
        control.close()


def rtpengine_relay(plan: RelayPlan, workdir: Path,
                    baselines: dict[int, GeneratorRun]) -> dict:
    binary = rtpengine_binary()
    if binary is None:
        return {"skipped": "rtpengine is not installed (apt-get install rtpengine-daemon)"}
    _check_generator_ports(max(plan.steps))
    rtpengine = RtpengineProcess(binary, workdir / "rtpengine")
    rtpengine.start()
    print(f"bench: rtpengine pid {rtpengine.pid}", flush=True)
    try:
        def run_step(calls: int, attempt: int) -> RelayStep:
            return rtpengine_relay_step(plan, workdir, rtpengine, calls, attempt,
                                        baselines[calls])

        result = _ramp(plan, "rtpengine", run_step, baselines, workdir)
    finally:
        rtpengine.stop()
    result["server"] = (f"rtpengine (userspace, --table=-1, --num-threads={rtpengine.threads}),"
                        " calls set up with ng offer/answer")
    return result


def run_relay(quick: bool, workdir: Path) -> dict:
    """Both ramps, sharing the direct-path baselines, and their ratio."""
    plan = RelayPlan.quick() if quick else RelayPlan.full()
    results: dict = {"criteria": plan.criteria()}
    baselines: dict[int, GeneratorRun] = {}
    for key, function in (("switch_relay", switch_relay), ("rtpengine_relay", rtpengine_relay)):
        if key != "switch_relay":
            time.sleep(plan.pause_between_steps_s)
        try:
            results[key] = function(plan, workdir, baselines)
        except BenchError as error:
            print(f"bench: {key}: {error}", file=sys.stderr, flush=True)
            results[key] = {"error": str(error)}
    results["baselines"] = {
        str(calls): {"latency_us": run.result["latency_us"], "lost": run.result["lost"],
                     "on_schedule": run.result["on_schedule"],
                     "generator_cpu_s": round(run.result["sender_cpu_s"]
                                              + run.result["receiver_cpu_s"], 2)}
        for calls, run in sorted(baselines.items())
    }
    switch = results["switch_relay"].get("max_zero_loss_calls")
    rtpengine = results["rtpengine_relay"].get("max_zero_loss_calls")
    if switch and rtpengine:
        results["switch_to_rtpengine_ratio"] = round(switch / rtpengine, 3)
    return results


if __name__ == "__main__":
    sys.exit(_generator_main(sys.argv[1:]))
