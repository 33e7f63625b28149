/*
 * boite guest init: PID 1 of the guest kit's initramfs.
 *
 * Built with `gcc -static -m32 -Os`, so one binary runs under the i386 kernel and,
 * through IA32 emulation, under x86_64 kernels.
 *
 * What it does, in order:
 *   1. mounts /proc, /sys, /dev (devtmpfs) and a tmpfs on /tmp;
 *   2. reads boite.* parameters from /proc/cmdline (the kernel hands dotted parameters
 *      to nobody, so they reach init only this way), opens the control line if any,
 *      and prints "BOITE-READY uptime=<seconds>" on the console;
 *        boite.run=CMD        run CMD with /bin/sh -c, then print "BOITE-EXIT status=N"
 *                             (N = exit code, or 128 + signal number);
 *                             quote it on the command line: boite.run="echo hi; ls /"
 *        boite.shell=1        start busybox sh on the console (after boite.run, if both)
 *        boite.exitport=PORT  before powering off, write the status byte (boite.run's
 *                             status, else 0) to I/O port PORT (isa-debug-exit style)
 *        boite.ctl=DEVICE     a control line (e.g. /dev/ttyS1 or /dev/hvc1): the line
 *                             "poweroff" asks for a soft stop
 *        boite.net=0          do not bring up the NICs (otherwise each ethN takes a
 *                             DHCP lease in the background: busybox udhcpc, its script
 *                             /usr/share/udhcpc/default.script)
 *        boite.ip=A/P,GW,DNS  a static address for eth0 instead of DHCP (for a kernel
 *                             without AF_PACKET, or a network without a DHCP server;
 *                             boite itself never passes it: its NAT serves DHCP)
 *        boite.tools=0        do not start the guest tools agent /sbin/boite-tools
 *                             (it leaves quietly on a machine without the tools port;
 *                             with nothing else asked for, init serves until stopped)
 *   3. runs what the parameters ask for;
 *   4. powers off cleanly: SIGTERM (then SIGKILL) to every process, sync,
 *      "BOITE-POWEROFF status=N reason=R", reboot(RB_POWER_OFF).
 * SIGTERM, SIGUSR1, SIGUSR2, SIGPWR and SIGINT (the kernel's Ctrl-Alt-Del, which init
 * asks for with RB_DISABLE_CAD) are soft stop requests: they lead to step 4. SIGQUIT
 * is a soft reboot: step 4, then "BOITE-REBOOT" and reboot(RB_AUTOBOOT).
 *
 * The markers are the interface to boite and its tests; they are documented in
 * src/boite/guestkit.py. Keep them in step.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define CMDLINE_MAX 4096

static volatile sig_atomic_t stop_signal;
static char cmdline[CMDLINE_MAX];
/* Self-pipe: a signal handler writes a byte, so the wait loop's poll() wakes up even if
 * the signal came between its checks and the poll call. (Plain poll, not ppoll: the
 * tiny i386 kernel's glibc path for ppoll was seen not to wake on signals.) */
static int wake_pipe[2] = {-1, -1};

/* Write a whole line to the console, unbuffered: markers must not sit in a buffer
 * when the machine powers off. */
static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(STDOUT_FILENO, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += w;
    }
}

static void wake(void)
{
    int saved = errno;
    if (wake_pipe[1] >= 0)
        (void)!write(wake_pipe[1], "", 1);
    errno = saved;
}
static void on_stop(int sig)
{
    stop_signal = sig;
    wake();
}
static void on_child(int sig)
{
    (void)sig;
    wake();
}

static void mount_one(const char *src, const char *dir, const char *type, unsigned long flags)
{
    mkdir(dir, 0755);
    if (mount(src, dir, type, flags, NULL) != 0 && errno != EBUSY)
        say("BOITE-WARN mount %s on %s: %s", type, dir, strerror(errno));
}

static void read_file(const char *path, char *buf, size_t size)
{
    buf[0] = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    size_t len = 0;
    while (len < size - 1) {
        ssize_t r = read(fd, buf + len, size - 1 - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += r;
    }
    buf[len] = 0;
    close(fd);
}

/* The value of KEY on the kernel command line, unquoted, in OUT; the last one wins, as
 * for the kernel's own parameters. Returns 1 if KEY was present. */
static int param(const char *key, char *out, size_t size)
{
    size_t klen = strlen(key);
    int found = 0;
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ' || *p == '\n' || *p == '\t')
            p++;
        if (!*p)
            break;
        /* One word, with the kernel's rules: double quotes group, and are dropped. */
        char word[CMDLINE_MAX];
        size_t w = 0;
        int quoted = 0;
        while (*p && (quoted || (*p != ' ' && *p != '\n' && *p != '\t'))) {
            if (*p == '"')
                quoted = !quoted;
            else if (w < sizeof word - 1)
                word[w++] = *p;
            p++;
        }
        word[w] = 0;
        if (strncmp(word, key, klen) == 0 && (word[klen] == '=' || word[klen] == 0)) {
            found = 1;
            snprintf(out, size, "%s", word[klen] == '=' ? word + klen + 1 : "");
        }
    }
    return found;
}

static void uptime(char *out, size_t size)
{
    char buf[64];
    read_file("/proc/uptime", buf, sizeof buf);
    char *sp = strchr(buf, ' ');
    if (sp)
        *sp = 0;
    snprintf(out, size, "%s", buf[0] ? buf : "unknown");
}

/* The console's own tty (console=ttyS0 -> /dev/ttyS0), so the shell gets a controlling
 * terminal and job control; /dev/console cannot be one. */
static void console_tty(char *out, size_t size)
{
    char val[64];
    if (param("console", val, sizeof val) && val[0]) {
        char *comma = strchr(val, ',');
        if (comma)
            *comma = 0;
        snprintf(out, size, "/dev/%s", val);
        if (access(out, R_OK | W_OK) == 0)
            return;
    }
    snprintf(out, size, "/dev/console");
}

static const char *const child_env[] = {
    "PATH=/bin:/sbin:/usr/bin:/usr/sbin", "HOME=/", "TERM=linux", "SHELL=/bin/sh", NULL};

static pid_t spawn(const char *tty, char *const argv[])
{
    pid_t pid = fork();
    if (pid < 0) {
        say("BOITE-ERROR fork: %s", strerror(errno));
        return -1;
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGUSR1, SIG_DFL);
        signal(SIGUSR2, SIG_DFL);
        signal(SIGPWR, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        if (tty) {
            setsid();
            int fd = open(tty, O_RDWR);
            if (fd >= 0) {
                dup2(fd, 0);
                dup2(fd, 1);
                dup2(fd, 2);
                if (fd > 2)
                    close(fd);
            }
        }
        chdir("/");
        execve(argv[0], argv, (char *const *)child_env);
        say("BOITE-ERROR exec %s: %s", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

/* Wait for PID while honouring stop requests and the control line. Returns its
 * wait status, or -1 if a stop was requested first. */
static int wait_for(pid_t pid, int ctl_fd)
{
    char line[128];
    size_t line_len = 0;
    for (;;) {
        int status;
        pid_t r;
        while ((r = waitpid(-1, &status, WNOHANG)) > 0)
            if (r == pid)
                return status;
        if (r < 0 && errno == ECHILD && pid > 0)
            return 0;
        if (stop_signal)
            return -1;
        struct pollfd pfds[2] = {{.fd = wake_pipe[0], .events = POLLIN},
                                 {.fd = ctl_fd, .events = POLLIN}};
        int n = poll(pfds, ctl_fd >= 0 ? 2 : 1, -1);
        if (n < 0 && errno != EINTR) {
            say("BOITE-WARN poll: %s", strerror(errno));
            sleep(1);
            continue;
        }
        if (n > 0 && (pfds[0].revents & POLLIN)) {
            char drain[64];
            while (read(wake_pipe[0], drain, sizeof drain) > 0)
                ;
        }
        struct pollfd pfd = pfds[1];
        if (n > 0 && ctl_fd >= 0 && (pfd.revents & POLLIN)) {
            char c;
            while (read(ctl_fd, &c, 1) == 1) {
                if (c == '\n' || c == '\r') {
                    line[line_len] = 0;
                    if (strcmp(line, "poweroff") == 0) {
                        say("BOITE-STOP reason=ctl");
                        stop_signal = SIGPWR;
                    }
                    line_len = 0;
                } else if (line_len < sizeof line - 1) {
                    line[line_len++] = c;
                }
            }
        } else if (n > 0 && ctl_fd >= 0 && (pfd.revents & (POLLHUP | POLLERR | POLLNVAL))) {
            ctl_fd = -1; /* the line went away: keep serving signals */
        }
    }
}

static void on_alarm(int sig)
{
    (void)sig;
}

/* Wait until the console has sent what we wrote: the UART driver transmits from a
 * buffer on interrupts, and an exit-port write ends the VM at once, losing the tail
 * (seen on a loaded host). Bounded, so a stuck line cannot stop the power-off. */
static void drain_console(void)
{
    struct sigaction sa = {0};
    sa.sa_handler = on_alarm; /* no SA_RESTART: the alarm breaks tcdrain with EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    alarm(3);
    tcdrain(STDOUT_FILENO);
    alarm(0);
}

static void power_off(int status, const char *reason, unsigned exitport)
{
    kill(-1, SIGTERM);
    /* Up to two seconds for everyone to leave, then force. */
    for (int i = 0; i < 40; i++) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        /* Orphans are ours too, so no child left means no process left. */
        if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD)
            break;
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    sync();
    if (stop_signal == SIGQUIT) {
        say("BOITE-REBOOT reason=%s", reason);
        drain_console();
        reboot(RB_AUTOBOOT);
    }
    say("BOITE-POWEROFF status=%d reason=%s", status, reason);
    drain_console();
    if (exitport) {
        if (ioperm(exitport, 1, 1) == 0)
            outb((unsigned char)status, exitport);
        else {
            say("BOITE-WARN ioperm 0x%x: %s", exitport, strerror(errno));
            drain_console();
        }
    }
    reboot(RB_POWER_OFF);
    /* Without a power-off method the kernel halts instead and does not return here. */
    say("BOITE-ERROR reboot(RB_POWER_OFF): %s", strerror(errno));
    drain_console();
    for (;;)
        pause();
}

int main(void)
{
    /* The kernel opened /dev/console (from the initramfs) as 0, 1, 2 if it could. */
    if (fcntl(STDOUT_FILENO, F_GETFD) < 0) {
        mount_one("devtmpfs", "/dev", "devtmpfs", 0);
        int fd = open("/dev/console", O_RDWR);
        if (fd >= 0) {
            dup2(fd, 0);
            dup2(fd, 1);
            dup2(fd, 2);
        }
    }
    mount_one("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC);
    mount_one("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC);
    mount_one("devtmpfs", "/dev", "devtmpfs", MS_NOSUID);
    mount_one("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV);

    if (pipe2(wake_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
        say("BOITE-WARN pipe: %s", strerror(errno));
    struct sigaction sa = {0};
    sa.sa_handler = on_stop;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    int stops[] = {SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGPWR, SIGQUIT};
    for (size_t i = 0; i < sizeof stops / sizeof stops[0]; i++)
        sigaction(stops[i], &sa, NULL);
    sa.sa_handler = on_child;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    reboot(RB_DISABLE_CAD); /* Ctrl-Alt-Del becomes SIGINT to us */

    read_file("/proc/cmdline", cmdline, sizeof cmdline);
    char run[CMDLINE_MAX], shell[16], port[32], ctl[128], tty[80], tools[16];
    int have_run = param("boite.run", run, sizeof run) && run[0];
    int have_shell = param("boite.shell", shell, sizeof shell) && strcmp(shell, "0") != 0;
    unsigned exitport = 0;
    if (param("boite.exitport", port, sizeof port) && port[0]) {
        char *end;
        unsigned long v = strtoul(port, &end, 0);
        if (*end || v == 0 || v > 0xffff)
            say("BOITE-WARN boite.exitport=%s: expected an I/O port number 1..0xffff", port);
        else
            exitport = (unsigned)v;
    }
    int ctl_fd = -1;
    if (param("boite.ctl", ctl, sizeof ctl) && ctl[0]) {
        ctl_fd = open(ctl, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (ctl_fd < 0)
            say("BOITE-WARN boite.ctl=%s: %s", ctl, strerror(errno));
    }
    console_tty(tty, sizeof tty);

    /* Ready means ready for requests too: the control line is open (bytes that reach a
     * serial port before anyone opens it are dropped by the UART driver). */
    char up[64];
    uptime(up, sizeof up);
    say("BOITE-READY uptime=%s", up);

    /* The NICs: eth0 from boite.ip= when given, else every ethN by DHCP in the
     * background (boite's NAT, passt, serves DHCP; so does QEMU's user networking). */
    char net[16], ipconf[128];
    if (!(param("boite.net", net, sizeof net) && strcmp(net, "0") == 0) &&
        access("/sys/class/net/eth0", F_OK) == 0) {
        static char script[768];
        if (param("boite.ip", ipconf, sizeof ipconf) && ipconf[0] &&
            strspn(ipconf, "0123456789./,") == strlen(ipconf)) {
            char *gw = strchr(ipconf, ','), *dns = NULL;
            if (gw) {
                *gw++ = 0;
                dns = strchr(gw, ',');
                if (dns)
                    *dns++ = 0;
            }
            snprintf(script, sizeof script,
                     "ip link set lo up; ip link set eth0 up; ip addr add %s dev eth0; "
                     "%s%s%s echo nameserver %s > /etc/resolv.conf; "
                     /* Say something first: a user-mode NAT (passt) learns the guest's
                      * MAC from its traffic, and cannot forward a port to it before. */
                     "%s%s%s",
                     ipconf, gw && *gw ? "ip route add default via " : "", gw ? gw : "",
                     gw && *gw ? ";" : "", dns && *dns ? dns : "127.0.0.1",
                     gw && *gw ? "ping -c 1 -W 2 " : "", gw ? gw : "",
                     gw && *gw ? " >/dev/null 2>&1" : "");
        } else {
            /* -b: keep asking in the background until a server answers; the DHCP
             * exchange is also what tells a user-mode NAT the guest's MAC. */
            snprintf(script, sizeof script,
                     "ip link set lo up; for n in /sys/class/net/eth*; do n=${n##*/}; "
                     "ip link set $n up; udhcpc -i $n -b -t 20 "
                     "-s /usr/share/udhcpc/default.script >/dev/null 2>&1 & done");
        }
        char *argv[] = {"/bin/sh", "-c", script, NULL};
        spawn(NULL, argv);
    }

    /* The guest tools agent: soft power off and reboot come back to us as signals. */
    pid_t tools_pid = -1;
    if (!(param("boite.tools", tools, sizeof tools) && strcmp(tools, "0") == 0) &&
        access("/sbin/boite-tools", X_OK) == 0) {
        char *argv[] = {"/sbin/boite-tools", "-q", "-p", "kill -PWR 1", "-r", "kill -QUIT 1", NULL};
        tools_pid = spawn(NULL, argv);
    }

    int status = 0;
    if (have_run) {
        char *argv[] = {"/bin/sh", "-c", run, NULL};
        pid_t pid = spawn(NULL, argv);
        int ws = pid > 0 ? wait_for(pid, ctl_fd) : (127 << 8);
        if (ws == -1)
            power_off(0, "stop-request", exitport);
        status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
        say("BOITE-EXIT status=%d", status);
    }
    if (have_shell) {
        char *argv[] = {"/bin/sh", NULL};
        pid_t pid = spawn(tty, argv);
        if (pid > 0 && wait_for(pid, ctl_fd) == -1)
            power_off(status, "stop-request", exitport);
        power_off(status, "shell-exit", exitport);
    }
    if (!have_run && !have_shell) {
        /* Nothing asked for: serve the guest tools while the agent runs (it leaves at
         * once where the machine has no tools port), else a boot test: wait for a stop
         * request only if a control line was given, so `boite stop` has something to stop. */
        int ws = tools_pid > 0 ? wait_for(tools_pid, ctl_fd) : 0;
        if (ws != -1 && ctl_fd >= 0)
            wait_for(0, ctl_fd);
    }
    power_off(status, stop_signal ? "stop-request" : "done", exitport);
}
