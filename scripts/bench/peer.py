#!/usr/bin/env python3
"""Peer worker for domkit-bench: the same measurements through python `qemu.qmp` or libvirt.

domkit-bench starts one worker per peer and drives it over stdin/stdout, one JSON object
per line each way, so the peers run interleaved with domkit and the raw client in ONE run
on the same machine. Every figure is measured inside the worker around the call being
measured only (never the IPC with domkit-bench), with the same statistics as the Rust side
(nearest-rank percentiles).

  peer.py qemu.qmp   talks to a QEMU spawned by domkit-bench (`-qmp unix:PATH`), or spawns
                     its own for the start/destroy figures (listen + accept, as domkit does)
  peer.py libvirt    talks to libvirtd (qemu:///system), which runs its own QEMU (same
                     binary, TCG, -S via VIR_DOMAIN_START_PAUSED): libvirt cannot attach to
                     a QEMU it did not start (virDomainQemuAttach is gone since 5.5).

Requests: {"op": "connect" | "rt" | "rt_conc" | "events" | "start" | "scale_connect" |
"scale_idle" | "scale_fanout" | "close", ...}; replies: {"ok": true, ...} or
{"ok": false, "error": "..."}.
"""

import asyncio
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time

IMPL = sys.argv[1] if len(sys.argv) > 1 else "qemu.qmp"


def percentile(sorted_vals, p):
    """Nearest-rank percentile (the definition domkit-bench uses)."""
    if not sorted_vals:
        return float("nan")
    k = max(1, math.ceil(p / 100.0 * len(sorted_vals)))
    return sorted_vals[k - 1]


def with_cpu(fn):
    """Adds the client process's CPU time and context switches per operation."""
    def wrapped(*args):
        cpu0, csw0 = cpu_and_wakeups()
        res = fn(*args)

        def finish(r):
            cpu1, csw1 = cpu_and_wakeups()
            n = max(1, r["n"])
            r["cpu_us_per_op"] = (cpu1 - cpu0) * 1e6 / n
            r["csw_per_op"] = (csw1 - csw0) / n
            return r

        if asyncio.iscoroutine(res):
            async def run():
                return finish(await res)
            return run()
        return finish(res)
    return wrapped


def lat_summary(lat_ns, elapsed_s):
    lat_ns.sort()
    return {
        "n": len(lat_ns),
        "ops_per_s": len(lat_ns) / elapsed_s,
        "p50_us": percentile(lat_ns, 50) / 1000.0,
        "p99_us": percentile(lat_ns, 99) / 1000.0,
    }


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_and_wakeups():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw + r.ru_nivcsw


def qemu_ts_us(ev):
    ts = ev["timestamp"]
    return ts["seconds"] * 1_000_000 + ts["microseconds"]


# ---------------------------------------------------------------------------- qemu.qmp
class QmpPeer:
    def __init__(self):
        from qemu.qmp import QMPClient  # noqa: F401  (fail early if not installed)

        self.loop = asyncio.new_event_loop()
        self.client = None
        self.clients = []

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def version(self):
        from importlib.metadata import version

        return {"peer": "qemu.qmp", "version": version("qemu.qmp")}

    async def connect(self, req):
        from qemu.qmp import QMPClient

        self.client = QMPClient("bench")
        await self.client.connect(req["socket"])
        return {}

    @with_cpu
    async def rt(self, req):
        c = self.client
        lat = []
        t0 = time.perf_counter_ns()
        end = t0 + int(req["secs"] * 1e9)
        while time.perf_counter_ns() < end:
            a = time.perf_counter_ns()
            await c.execute("query-status")
            lat.append(time.perf_counter_ns() - a)
        return lat_summary(lat, (time.perf_counter_ns() - t0) / 1e9)

    async def rt_conc(self, req):
        c = self.client
        done = [0]
        t0 = time.perf_counter_ns()
        end = t0 + int(req["secs"] * 1e9)

        async def caller():
            while time.perf_counter_ns() < end:
                await c.execute("query-status")
                done[0] += 1

        await asyncio.gather(*(caller() for _ in range(req["callers"])))
        el = (time.perf_counter_ns() - t0) / 1e9
        return {"ops_per_s": done[0] / el}

    async def events(self, req):
        from qemu.qmp import EventListener

        c = self.client
        lat = []
        listener = EventListener(("STOP", "RESUME"))
        with c.listen(listener):
            for _ in range(req["n"]):
                # -S leaves QEMU in `prelaunch`: `stop` there changes nothing and emits no
                # event, so each cycle is cont (RESUME) then stop (STOP).
                for cmd in ("cont", "stop"):
                    await c.execute(cmd)
                    ev = await listener.get()
                    now = time.time_ns() // 1000
                    lat.append((now - qemu_ts_us(ev)) * 1000)
        s = lat_summary(lat, 1.0)
        del s["ops_per_s"]
        return s

    async def start(self, req):
        """Spawn a QEMU, accept its monitor (it connects to us, like domkit), run it, quit."""
        from qemu.qmp import QMPClient

        d = tempfile.mkdtemp(prefix="bench-pyqmp-")
        sock = os.path.join(d, "qmp.sock")
        c = QMPClient("start")
        await c.start_server(sock)
        argv = req["argv"] + [
            "-chardev", f"socket,id=mon,path={sock},server=off",
            "-mon", "chardev=mon,mode=control",
        ]
        t0 = time.perf_counter_ns()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        await c.accept()
        t_ready = time.perf_counter_ns()
        await c.execute("cont")
        st = await c.execute("query-status")
        assert st["running"], st
        t_run = time.perf_counter_ns()
        # Destroy the way a manager does: quit, then wait for the process to be gone.
        t1 = time.perf_counter_ns()
        try:
            await c.execute("quit")
        except Exception:  # QEMU may close the socket before replying
            pass
        await proc.wait()
        t_gone = time.perf_counter_ns()
        try:
            await c.disconnect()
        except Exception:  # the EOF of the quit is re-raised here; it is expected
            pass
        try:
            os.rmdir(d)
        except OSError:
            pass
        return {
            "qmp_ready_ms": (t_ready - t0) / 1e6,
            "running_ms": (t_run - t0) / 1e6,
            "destroy_ms": (t_gone - t1) / 1e6,
        }

    async def scale_connect(self, req):
        from qemu.qmp import QMPClient

        base = rss_kib()
        first = None
        for i, path in enumerate(req["sockets"]):
            c = QMPClient(f"vm{i}")
            await c.connect(path)
            self.clients.append(c)
            if first is None:
                # The marginal cost per VM is measured from here (domkit-bench does the same).
                first = rss_kib()
        return {"rss_base_kib": base, "rss_first_kib": first, "rss_kib": rss_kib(),
                "n": len(self.clients)}

    async def scale_idle(self, req):
        cpu0, w0 = cpu_and_wakeups()
        t0 = time.monotonic()
        await asyncio.sleep(req["secs"])
        cpu1, w1 = cpu_and_wakeups()
        return {"cpu_s": cpu1 - cpu0, "wakeups": w1 - w0, "secs": time.monotonic() - t0}

    async def scale_fanout(self, req):
        times = []
        for _ in range(req["rounds"]):
            t0 = time.perf_counter_ns()
            await asyncio.gather(*(c.execute("query-status") for c in self.clients))
            times.append(time.perf_counter_ns() - t0)
        times.sort()
        return {"fanout_ms": percentile(times, 50) / 1e6}

    async def scale_close(self, _req):
        for c in self.clients:
            await c.disconnect()
        self.clients = []
        return {}

    async def close(self, req):
        await self.scale_close(req)
        if self.client is not None:
            await self.client.disconnect()
        return {}


# ---------------------------------------------------------------------------- libvirt
LIBVIRT_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>{qemu}</emulator></devices>
</domain>"""


class LibvirtPeer:
    def __init__(self):
        import libvirt

        self.libvirt = libvirt
        libvirt.virEventRegisterDefaultImpl()
        self.stop_loop = False
        self.loop_thread = threading.Thread(target=self._event_loop, daemon=True)
        self.loop_thread.start()
        self.conn = libvirt.open("qemu:///system")
        self.dom = None
        self.cond = threading.Condition()
        self.lifecycle = []  # (arrival wall us, event, detail)
        self.monitor = []  # (arrival wall us, name, qemu ts us)
        self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    def _event_loop(self):
        while not self.stop_loop:
            self.libvirt.virEventRunDefaultImpl()

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque):
        now = time.time_ns() // 1000
        with self.cond:
            self.lifecycle.append((now, dom.name(), event, detail))
            self.cond.notify_all()

    def _on_monitor(self, _conn, dom, event, seconds, micros, _details, _opaque):
        now = time.time_ns() // 1000
        with self.cond:
            self.monitor.append((now, dom.name(), event, seconds * 1_000_000 + micros))
            self.cond.notify_all()

    def run(self, result):
        return result

    def version(self):
        v = self.libvirt.getVersion()
        return {"peer": "libvirt", "version": f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"}

    def _create(self, name, mem, qemu, paused):
        flags = self.libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        try:
            old = self.conn.lookupByName(name)
            old.destroy()
        except self.libvirt.libvirtError:
            pass
        return self.conn.createXML(LIBVIRT_XML.format(name=name, mem=mem, qemu=qemu), flags)

    def connect(self, req):
        import libvirt_qemu

        self.libvirt_qemu = libvirt_qemu
        self.dom = self._create("domkit-bench-lv", req.get("memory_mib", 64), req["qemu"], True)
        libvirt_qemu.qemuMonitorEventRegister(
            self.conn, self.dom, None, self._on_monitor, None, 0)
        return {}

    def _query(self):
        # The one libvirt call that is a QMP round trip on demand: virDomainGetState and
        # friends answer from libvirtd's cache and never reach QEMU.
        self.libvirt_qemu.qemuMonitorCommand(self.dom, '{"execute":"query-status"}', 0)

    @with_cpu
    def rt(self, req):
        lat = []
        t0 = time.perf_counter_ns()
        end = t0 + int(req["secs"] * 1e9)
        while time.perf_counter_ns() < end:
            a = time.perf_counter_ns()
            self._query()
            lat.append(time.perf_counter_ns() - a)
        return lat_summary(lat, (time.perf_counter_ns() - t0) / 1e9)

    def rt_conc(self, req):
        end = time.perf_counter_ns() + int(req["secs"] * 1e9)
        counts = [0] * req["callers"]

        def caller(i):
            while time.perf_counter_ns() < end:
                self._query()
                counts[i] += 1

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(req["callers"])]
        t0 = time.perf_counter_ns()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        el = (time.perf_counter_ns() - t0) / 1e9
        return {"ops_per_s": sum(counts) / el}

    def _wait(self, lst, pred, timeout=10.0):
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, item in enumerate(lst):
                    if pred(item):
                        return lst.pop(i)
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError("libvirt event did not arrive")
                self.cond.wait(left)

    def events(self, req):
        lv = self.libvirt
        name = self.dom.name()
        lat, mon_lat = [], []
        with self.cond:
            self.lifecycle.clear()
            self.monitor.clear()
        for _ in range(req["n"]):
            for op, qev, lev in ((self.dom.resume, "RESUME", lv.VIR_DOMAIN_EVENT_RESUMED),
                                 (self.dom.suspend, "STOP", lv.VIR_DOMAIN_EVENT_SUSPENDED)):
                op()
                arrival, _, _, _ = self._wait(
                    self.lifecycle, lambda e, lev=lev: e[1] == name and e[2] == lev)
                m_arrival, _, _, qts = self._wait(
                    self.monitor, lambda e, qev=qev: e[1] == name and e[2] == qev)
                # The lifecycle event carries no QEMU timestamp; the raw monitor event of the
                # same transition does.
                lat.append((arrival - qts) * 1000)
                mon_lat.append((m_arrival - qts) * 1000)
        s = lat_summary(lat, 1.0)
        del s["ops_per_s"]
        m = lat_summary(mon_lat, 1.0)
        s["monitor_event_p50_us"] = m["p50_us"]
        return s

    def start(self, req):
        t0 = time.perf_counter_ns()
        dom = self._create("domkit-bench-lv-start", req.get("memory_mib", 64), req["qemu"],
                           False)
        t_run = time.perf_counter_ns()
        state, _ = dom.state()
        assert state == self.libvirt.VIR_DOMAIN_RUNNING, state
        t1 = time.perf_counter_ns()
        dom.destroy()
        t_gone = time.perf_counter_ns()
        return {"running_ms": (t_run - t0) / 1e6, "destroy_ms": (t_gone - t1) / 1e6}

    def close(self, _req):
        if self.dom is not None:
            try:
                self.dom.destroy()
            except self.libvirt.libvirtError:
                pass
            self.dom = None
        return {}


def main():
    peer = QmpPeer() if IMPL == "qemu.qmp" else LibvirtPeer()
    out = sys.stdout
    out.write(json.dumps({"ok": True, **peer.version()}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req["op"]
        try:
            fn = getattr(peer, op)
            res = peer.run(fn(req))
            reply = {"ok": True, **res}
        except Exception as e:  # reported to domkit-bench, which records the failure
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if op == "close":
            break


if __name__ == "__main__":
    main()
