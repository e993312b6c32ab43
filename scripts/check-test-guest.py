#!/usr/bin/env python3
"""Smoke check of domkit's test guest (scripts/build-test-guest.sh) under real QEMU (TCG).

S3: no extra QEMU flag is needed with QEMU 7.2's default machine (pc-i440fx): PIIX4_PM's
disable_s3 defaults to 0, so the guest sees "ACPI: PM: (supports S0 S3 S4 S5)", its
/sys/power/mem_sleep offers "deep", and qemu-ga's fallback (write "mem" to /sys/power/state;
the guest has no systemd/pm-utils) enters real ACPI S3 -> QMP SUSPEND. The machine is pinned
with `-machine pc` below; `-global PIIX4_PM.disable_s3=1` would turn S3 off. Boot the bzImage
(not a PVH vmlinux: with PVH boot, S3 resume becomes a cold reboot).

QEMU command line per VM (see Vm.argv):
  qemu-system-x86_64 -accel tcg -machine pc -m 128 -nodefaults -display none -no-user-config
    -kernel vmlinuz -initrd initrd.img -append "console=ttyS0 [domkit.ignore_shutdown=1]"
    -serial file:LOG -qmp unix:QMP,server=on,wait=off
    -chardev socket,path=QGA,server=on,wait=off,id=qga0
    -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
    -device pvpanic [-action panic=pause  (panic VM only)]

Usage: scripts/check-test-guest.py [--guest-dir DIR] [--boot-timeout S]
Without --guest-dir the guest is built (or taken from cache) by scripts/build-test-guest.sh.
Prints one PASS/FAIL line per check and "N passed, N failed" last; exit 1 on any failure.
QEMU is always killed and the 0700 temp dir removed, on failure and on SIGINT/SIGTERM too.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
READY = b"DOMKIT-GUEST-READY"
QGA_PORT = "org.qemu.guest_agent.0"


class CheckFailed(Exception):
    pass


def remaining(deadline):
    return max(0.0, deadline - time.monotonic())


class Qmp:
    """Minimal blocking QMP client that keeps every event it reads."""

    def __init__(self, path, timeout):
        deadline = time.monotonic() + timeout
        self.sock = None
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                self.sock = s
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise CheckFailed("QMP socket %s never accepted a connection" % path)
                time.sleep(0.05)
        self.buf = b""
        self.eof = False
        self.events = []
        self.next_id = 1
        greeting = self._read_msg(deadline)
        if greeting is None or "QMP" not in greeting:
            raise CheckFailed("no QMP greeting: %r" % (greeting,))
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        reply = self.cmd("qmp_capabilities")
        if reply is None or "return" not in reply:
            raise CheckFailed("qmp_capabilities failed: %r" % (reply,))

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _read_msg(self, deadline):
        """Next JSON message (events are also appended to self.events); None on EOF/timeout."""
        while b"\n" not in self.buf:
            if self.eof or self.sock is None:
                return None
            left = remaining(deadline)
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        if not line.strip():
            return self._read_msg(deadline)
        msg = json.loads(line)
        if "event" in msg:
            self.events.append(msg)
        return msg

    def cmd(self, name, args=None, timeout=15):
        """Send a command; return its reply dict, or None if the reply never came (EOF)."""
        cid = "c%d" % self.next_id
        self.next_id += 1
        req = {"execute": name, "id": cid}
        if args is not None:
            req["arguments"] = args
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError:
            return None
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_msg(deadline)
            if msg is None:
                return None
            if msg.get("id") == cid and ("return" in msg or "error" in msg):
                return msg

    def status(self):
        reply = self.cmd("query-status")
        if reply is None or "return" not in reply:
            raise CheckFailed("query-status failed: %r" % (reply,))
        return reply["return"]["status"]

    def wait_event(self, name, start, timeout, pred=None):
        """First event `name` at index >= start (matching pred), waiting up to timeout."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                if ev["event"] == name and (pred is None or pred(ev.get("data", {}))):
                    return ev
            if remaining(deadline) <= 0 or self.eof:
                return None
            self._read_msg(deadline)

    def pump(self, seconds):
        """Read (and record) events for `seconds`."""
        deadline = time.monotonic() + seconds
        while remaining(deadline) > 0 and not self.eof:
            self._read_msg(deadline)

    def names(self, start):
        return [e["event"] for e in self.events[start:]]


class Qga:
    """Guest agent client over the virtio-serial chardev socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.eof = False
        self.sync_id = int(time.time() * 1000) % 1000000000

    def close(self):
        self.sock.close()

    def _fill(self, deadline):
        left = remaining(deadline)
        if left <= 0 or self.eof:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self, deadline):
        while b"\n" not in self.buf:
            if not self._fill(deadline):
                return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def send(self, name, args=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")

    def sync(self, timeout):
        """guest-sync-delimited: send 0xFF + sync, skip everything up to the 0xFF of the reply."""
        deadline = time.monotonic() + timeout
        while remaining(deadline) > 0:
            self.sync_id += 1
            sid = self.sync_id
            req = {"execute": "guest-sync-delimited", "arguments": {"id": sid}}
            self.sock.sendall(b"\xff" + json.dumps(req).encode() + b"\n")
            attempt = min(deadline, time.monotonic() + 3.0)
            while True:
                while b"\xff" not in self.buf:
                    self.buf = b""
                    if not self._fill(attempt):
                        break
                if b"\xff" not in self.buf:
                    break  # this attempt timed out: resend with a new id
                self.buf = self.buf.split(b"\xff", 1)[1]
                line = self._line(attempt)
                if line is None:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("return") == sid:
                    return
            if self.eof:
                raise CheckFailed("agent socket closed during guest-sync-delimited")
        raise CheckFailed("no guest-sync-delimited reply within %.0f s" % timeout)

    def cmd(self, name, args=None, timeout=15):
        self.send(name, args)
        deadline = time.monotonic() + timeout
        while True:
            line = self._line(deadline)
            if line is None:
                raise CheckFailed("no agent reply to %s" % name)
            line = line.lstrip(b"\xff").strip()
            if not line:
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise CheckFailed("agent %s: %s" % (name, msg["error"]))
            return msg.get("return")

    def drain(self, timeout):
        """Whatever the agent sends within timeout (stops at EOF)."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline):
            pass
        out, self.buf = self.buf, b""
        return out

    def exec_sh(self, script, timeout=15, wait=True):
        """guest-exec /bin/sh -c SCRIPT; with wait, poll guest-exec-status and return stdout."""
        ret = self.cmd("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                      "capture-output": wait}, timeout=timeout)
        if not wait:
            return ret
        deadline = time.monotonic() + timeout
        while remaining(deadline) > 0:
            st = self.cmd("guest-exec-status", {"pid": ret["pid"]}, timeout=timeout)
            if st.get("exited"):
                return base64.b64decode(st.get("out-data", "")).decode(errors="replace")
            time.sleep(0.1)
        raise CheckFailed("guest-exec %r did not finish" % script)


class Vm:
    def __init__(self, tmp, guest_dir, name, append=(), extra=()):
        self.name = name
        self.dir = os.path.join(tmp, name)
        os.mkdir(self.dir, 0o700)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.qga_path = os.path.join(self.dir, "qga.sock")
        self.log_path = os.path.join(self.dir, "serial.log")
        self.out_path = os.path.join(self.dir, "qemu.out")
        self.argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "128",
            "-nodefaults", "-display", "none", "-no-user-config",
            "-kernel", os.path.join(guest_dir, "vmlinuz"),
            "-initrd", os.path.join(guest_dir, "initrd.img"),
            "-append", " ".join(["console=ttyS0"] + list(append)),
            "-serial", "file:" + self.log_path,
            "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
            "-chardev", "socket,path=%s,server=on,wait=off,id=qga0" % self.qga_path,
            "-device", "virtio-serial",
            "-device", "virtserialport,chardev=qga0,name=" + QGA_PORT,
            "-device", "pvpanic",
        ] + list(extra)
        self.qmp = None
        self.qga = None
        self.proc = None
        with open(self.out_path, "wb") as out:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.qmp = Qmp(self.qmp_path, 15)
        except BaseException:
            self.kill()
            raise

    def elapsed(self):
        return time.monotonic() - self.t0

    def serial(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def wait_ready(self, count, timeout):
        deadline = time.monotonic() + timeout
        while self.serial().count(READY) < count:
            if self.proc.poll() is not None:
                raise CheckFailed("qemu exited (%s) before the guest was ready" % self.proc.returncode)
            if remaining(deadline) <= 0:
                raise CheckFailed("no %s #%d on the serial console within %.0f s"
                                  % (READY.decode(), count, timeout))
            time.sleep(0.05)

    def agent(self, timeout):
        """(Re)connect to the agent and sync; the chardev serves one client at a time."""
        if self.qga is not None:
            self.qga.close()
            self.qga = None
        self.qga = Qga(self.qga_path)
        self.qga.sync(timeout)
        return self.qga

    def boot(self, timeout):
        self.wait_ready(1, timeout)
        qga = self.agent(timeout)
        qga.cmd("guest-ping")
        return self.elapsed()

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        for c in (self.qga, self.qmp):
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def diagnostics(self):
        lines = self.serial().decode(errors="replace").replace("\r", "").splitlines()[-12:]
        try:
            with open(self.out_path, "rb") as f:
                lines += ["qemu: " + l for l in f.read().decode(errors="replace").splitlines()[-5:]]
        except OSError:
            pass
        if self.qmp is not None:
            lines.append("events: %s" % " ".join(self.qmp.names(0)))
        return lines


class Runner:
    def __init__(self, boot_timeout):
        self.boot_timeout = boot_timeout
        self.passed = 0
        self.failed = 0
        self.vms = []

    def vm(self, tmp, guest_dir, name, **kw):
        """Start a VM; on failure count a FAIL and return None (its checks are skipped)."""
        try:
            vm = Vm(tmp, guest_dir, name, **kw)
        except (CheckFailed, OSError) as e:
            self.failed += 1
            print("FAIL start %s: %s" % (name, e), flush=True)
            return None
        self.vms.append(vm)
        return vm

    def check(self, name, fn, vm=None):
        try:
            if vm is None:
                raise CheckFailed("skipped: the VM did not come up")
            detail = fn(vm)
        except Exception as e:  # a check failing must not stop the others
            self.failed += 1
            msg = str(e) if isinstance(e, CheckFailed) else "%s: %s" % (type(e).__name__, e)
            print("FAIL %s: %s" % (name, msg), flush=True)
            if vm is not None:
                for line in vm.diagnostics():
                    print("    | " + line, flush=True)
            return False
        self.passed += 1
        print("PASS %s: %s" % (name, detail), flush=True)
        return True

    def cleanup(self):
        for vm in self.vms:
            vm.kill()


def stop(vm):
    if vm is not None:
        vm.kill()


def expect_exit0(vm, timeout=30):
    rc = vm.wait_exit(timeout)
    if rc is None:
        raise CheckFailed("qemu still running %.0f s after SHUTDOWN" % timeout)
    if rc != 0:
        raise CheckFailed("qemu exited %d" % rc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest-dir", help="use this built guest instead of running the build script")
    ap.add_argument("--boot-timeout", type=float, default=90.0,
                    help="seconds to wait for a boot (TCG, loaded machine); default 90")
    opts = ap.parse_args()

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    if shutil.which("qemu-system-x86_64") is None:
        print("check-test-guest: qemu-system-x86_64 not found; run scripts/install-deps.sh",
              file=sys.stderr)
        return 2
    guest_dir = opts.guest_dir
    if guest_dir is None:
        build = subprocess.run([os.path.join(HERE, "build-test-guest.sh")],
                               stdout=subprocess.PIPE, text=True)
        if build.returncode != 0 or not build.stdout.strip():
            print("check-test-guest: build-test-guest.sh failed (%d)" % build.returncode,
                  file=sys.stderr)
            return 2
        guest_dir = build.stdout.strip().splitlines()[-1]
    for f in ("vmlinuz", "initrd.img"):
        if not os.path.isfile(os.path.join(guest_dir, f)):
            print("check-test-guest: %s missing in %s" % (f, guest_dir), file=sys.stderr)
            return 2

    base = os.environ.get("TMPDIR", "/tmp")
    if len(base) > 60:  # unix socket paths are limited to 107 bytes
        base = "/tmp"
    tmp = tempfile.mkdtemp(prefix="domkit-check-", dir=base)  # mode 0700
    r = Runner(opts.boot_timeout)
    bt = opts.boot_timeout
    try:
        # ---- VM 1: boot, suspend/wakeup, reboot, system_powerdown ---------------------------
        vm1 = r.vm(tmp, guest_dir, "vm1")
        info = {}

        def boot(vm):
            t = vm.boot(bt)
            info["mem_sleep"] = vm.qga.exec_sh("cat /sys/power/mem_sleep").strip()
            return "guest-ping answered %.1f s after spawn (QEMU %s.%s.%s, mem_sleep: %s)" % (
                t, vm.qmp.version.get("major"), vm.qmp.version.get("minor"),
                vm.qmp.version.get("micro"), info["mem_sleep"])

        ok1 = r.check("1 boot + guest-ping", boot, vm1)
        up1 = vm1 if ok1 else None

        def suspend(vm):
            start = len(vm.qmp.events)
            t = time.monotonic()
            vm.qga.send("guest-suspend-ram")
            if vm.qmp.wait_event("SUSPEND", start, 30) is None:
                raise CheckFailed("no SUSPEND event; events: %s" % vm.qmp.names(start))
            t_susp = time.monotonic() - t
            st = vm.qmp.status()
            if st != "suspended":
                raise CheckFailed("status %r after SUSPEND, want suspended" % st)
            mid = len(vm.qmp.events)
            t = time.monotonic()
            reply = vm.qmp.cmd("system_wakeup")
            if reply is None or "error" in reply:
                raise CheckFailed("system_wakeup: %r" % (reply,))
            if vm.qmp.wait_event("WAKEUP", mid, 10) is None:
                raise CheckFailed("no WAKEUP event; events: %s" % vm.qmp.names(mid))
            qga = vm.agent(30)
            qga.cmd("guest-ping")
            t_back = time.monotonic() - t
            st = vm.qmp.status()
            if st != "running":
                raise CheckFailed("status %r after wakeup" % st)
            klog = qga.exec_sh("dmesg")
            for want in ("PM: suspend entry (deep)", "Waking up from system sleep state S3"):
                if want not in klog:
                    raise CheckFailed("guest kernel log lacks %r: not a real S3" % want)
            return "real S3 (deep); SUSPEND %.1f s after guest-suspend-ram; WAKEUP, agent back %.1f s after " \
                   "system_wakeup (events: %s)" % (t_susp, t_back, " ".join(vm.qmp.names(start)))

        r.check("5 guest-suspend-ram -> SUSPEND, system_wakeup -> WAKEUP", suspend, up1)

        def reboot(vm):
            n = vm.serial().count(READY)
            start = len(vm.qmp.events)
            t = time.monotonic()
            vm.qga.exec_sh("sleep 0.3; reboot -f", wait=False)
            if vm.qmp.wait_event("RESET", start, 30, lambda d: d.get("guest") is True) is None:
                raise CheckFailed("no RESET{guest:true}; events: %s" % vm.qmp.names(start))
            vm.wait_ready(n + 1, bt)
            t_ready = time.monotonic() - t
            qga = vm.agent(bt)
            qga.cmd("guest-ping")
            resets = vm.qmp.names(start).count("RESET")
            if vm.proc.poll() is not None:
                raise CheckFailed("qemu exited on guest reboot")
            return "%d RESET event(s); READY again %.1f s, guest-ping %.1f s after guest-exec" % (
                resets, t_ready, time.monotonic() - t)

        r.check("3 guest-exec reboot -f -> RESET, guest back", reboot, up1)

        def powerdown(vm):
            start = len(vm.qmp.events)
            t = time.monotonic()
            vm.qmp.cmd("system_powerdown")
            if vm.qmp.wait_event("POWERDOWN", start, 5) is None:
                raise CheckFailed("no POWERDOWN; events: %s" % vm.qmp.names(start))
            ev = vm.qmp.wait_event("SHUTDOWN", start, 30)
            if ev is None:
                raise CheckFailed("no SHUTDOWN within 30 s; events: %s" % vm.qmp.names(start))
            if ev.get("data", {}).get("guest") is not True:
                raise CheckFailed("SHUTDOWN not from the guest: %s" % ev.get("data"))
            dt = time.monotonic() - t
            expect_exit0(vm)
            return "POWERDOWN, SHUTDOWN%s after %.2f s, qemu exit 0" % (
                json.dumps(ev.get("data")), dt)

        r.check("2 system_powerdown -> POWERDOWN, SHUTDOWN{guest}, exit 0", powerdown, up1)
        stop(vm1)

        # ---- VM 2: panic --------------------------------------------------------------------
        vm2 = r.vm(tmp, guest_dir, "vm2", extra=["-action", "panic=pause"])

        def panic(vm):
            t_boot = vm.boot(bt)
            start = len(vm.qmp.events)
            vm.qga.exec_sh("sleep 0.3; echo c > /proc/sysrq-trigger", wait=False)
            ev = vm.qmp.wait_event("GUEST_PANICKED", start, 30)
            if ev is None:
                raise CheckFailed("no GUEST_PANICKED; events: %s" % vm.qmp.names(start))
            st = vm.qmp.status()
            if st != "guest-panicked":
                raise CheckFailed("status %r, want guest-panicked" % st)
            vm.qmp.cmd("quit")
            expect_exit0(vm, 15)
            return "booted in %.1f s; GUEST_PANICKED%s, status guest-panicked (-action panic=pause)" % (
                t_boot, json.dumps(ev.get("data")))

        r.check("4 sysrq-trigger c -> GUEST_PANICKED", panic, vm2)
        stop(vm2)

        # ---- VM 3: domkit.ignore_shutdown=1 ---------------------------------------------------
        vm3 = r.vm(tmp, guest_dir, "vm3", append=["domkit.ignore_shutdown=1"])

        def ignore_powerdown(vm):
            t_boot = vm.boot(bt)
            start = len(vm.qmp.events)
            vm.qmp.cmd("system_powerdown")
            if vm.qmp.wait_event("POWERDOWN", start, 5) is None:
                raise CheckFailed("no POWERDOWN; events: %s" % vm.qmp.names(start))
            vm.qmp.pump(10)
            if "SHUTDOWN" in vm.qmp.names(start) or vm.proc.poll() is not None:
                raise CheckFailed("guest shut down; events: %s" % vm.qmp.names(start))
            st = vm.qmp.status()
            if st != "running":
                raise CheckFailed("status %r, want running" % st)
            return "booted in %.1f s; POWERDOWN and no SHUTDOWN in 10 s, still running" % t_boot

        ok6 = r.check("6 ignore_shutdown: system_powerdown -> POWERDOWN, no SHUTDOWN in 10 s",
                      ignore_powerdown, vm3)

        def ignore_agent_shutdown(vm):
            start = len(vm.qmp.events)
            vm.qga.send("guest-shutdown")
            vm.qmp.pump(5)
            if "SHUTDOWN" in vm.qmp.names(start) or vm.proc.poll() is not None:
                raise CheckFailed("guest shut down; events: %s" % vm.qmp.names(start))
            qga = vm.agent(15)
            qga.cmd("guest-ping")
            vm.qmp.cmd("quit")
            expect_exit0(vm, 15)
            return "no SHUTDOWN in 5 s, agent still answers"

        r.check("6b ignore_shutdown: agent guest-shutdown is ignored", ignore_agent_shutdown,
                vm3 if ok6 else None)
        stop(vm3)

        # ---- VM 4: agent guest-shutdown -----------------------------------------------------
        vm4 = r.vm(tmp, guest_dir, "vm4")

        def agent_shutdown(vm):
            t_boot = vm.boot(bt)
            start = len(vm.qmp.events)
            t = time.monotonic()
            vm.qga.send("guest-shutdown")
            ev = vm.qmp.wait_event("SHUTDOWN", start, 30)
            if ev is None:
                raise CheckFailed("no SHUTDOWN; events: %s" % vm.qmp.names(start))
            if ev.get("data", {}).get("guest") is not True:
                raise CheckFailed("SHUTDOWN not from the guest: %s" % ev.get("data"))
            dt = time.monotonic() - t
            expect_exit0(vm)
            extra = vm.qga.drain(2).strip()
            if extra:
                raise CheckFailed("agent replied to guest-shutdown: %r" % extra)
            return "booted in %.1f s; no agent reply, SHUTDOWN%s after %.2f s, qemu exit 0" % (
                t_boot, json.dumps(ev.get("data")), dt)

        r.check("7 agent guest-shutdown -> SHUTDOWN{guest}, exit 0", agent_shutdown, vm4)
        stop(vm4)
    except BaseException as e:  # keep counting; cleanup below always runs
        r.failed += 1
        print("FAIL aborted: %s: %s" % (type(e).__name__, e), flush=True)
    finally:
        r.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (r.passed, r.failed), flush=True)
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
