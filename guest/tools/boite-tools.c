/*
 * boite-tools: the guest agent of boite (the VMware Tools role).
 *
 * It talks to the VMM over the virtio-console port named "org.boite.tools.0" (found in
 * /sys/class/virtio-ports/ * /name, opened as /dev/vportNpM) with the framed protocol
 * of docs/tools-protocol.md: run commands (pipes or a PTY), copy files both ways, report
 * the guest's addresses, set the clock, power off or reboot, answer heartbeats.
 *
 * Build: gcc -static -m32 -Os -o boite-tools boite-tools.c   (runs on i386 and, through
 * IA32 emulation, x86_64 Linux). The guest kit's init starts it; in your own guest run it
 * as root at boot (a systemd unit or rc.local line is in docs/tools-protocol.md).
 *
 *   boite-tools [-d DEVICE | -f FD] [-p POWEROFF-CMD] [-r REBOOT-CMD] [-1] [-q]
 *     -d DEVICE   the port's device (default: found by the port's name)
 *     -f FD       an already open descriptor (tests run the agent on a socketpair)
 *     -p / -r     shell commands for power off / reboot (default: poweroff / reboot)
 *     -1          serve once: exit when the channel breaks instead of reopening it
 *     -q          quiet: a machine without the tools port is not an error (exit 0)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define AGENT_NAME "boite-tools 1.0"
#define PORT_NAME "org.boite.tools.0"
#define HEADER 12
#define MAX_PAYLOAD 65536
#define MAX_STREAMS 64
#define CHUNK 32768

enum {
    T_HELLO = 1, T_PING, T_PONG, T_EXEC, T_STARTED, T_STDIN, T_STDOUT, T_STDERR, T_EXIT,
    T_RESIZE, T_KILL, T_PUT, T_GET, T_DATA, T_OK, T_ERROR, T_INFO, T_TIME, T_POWER, T_CLOSE,
    T_FILEINFO,
};
#define EXEC_PTY 1u

struct stream {
    uint32_t id; /* 0: free */
    pid_t pid;   /* exec: the child, 0 once reaped */
    int status;  /* its exit code (0..255, or 128 + signal) */
    int in_fd, out_fd, err_fd; /* exec: pipes or the PTY master (in_fd == out_fd) */
    int pty;
    int file_fd; /* put: the temporary file; get: the file being sent */
    int get;     /* get: sending */
    char path[4096], tmp[4200];
};

static struct stream streams[MAX_STREAMS];
static int chan = -1;
static const char *poweroff_cmd = "poweroff", *reboot_cmd = "reboot";
static int child_pipe[2] = {-1, -1};

static void die_channel(const char *why);

/* --- framing ------------------------------------------------------------------------ */
static void put16(unsigned char *p, uint32_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(unsigned char *p, uint32_t v) { put16(p, v); put16(p + 2, v >> 16); }
static uint32_t get16(const unsigned char *p) { return p[0] | (uint32_t)p[1] << 8; }
static uint32_t get32(const unsigned char *p) { return get16(p) | get16(p + 2) << 16; }

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            poll(&pfd, 1, 1000);
            continue;
        }
        if (w <= 0)
            return -1;
        p += w;
        len -= w;
    }
    return 0;
}

static void send_frame(int type, uint32_t stream, const void *data, size_t len)
{
    unsigned char hdr[HEADER];
    put32(hdr, len);
    put16(hdr + 4, type);
    put16(hdr + 6, 0);
    put32(hdr + 8, stream);
    /* One write for small frames: the port hands each write to the host as a buffer. */
    static unsigned char out[HEADER + MAX_PAYLOAD];
    memcpy(out, hdr, HEADER);
    if (len)
        memcpy(out + HEADER, data, len);
    if (write_all(chan, out, HEADER + len) != 0)
        die_channel("write");
}

static void send_error(uint32_t stream, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void send_error(uint32_t stream, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    send_frame(T_ERROR, stream, msg, n < 0 ? 0 : (size_t)(n < (int)sizeof msg ? n : (int)sizeof msg - 1));
}

static void send_hello(void)
{
    unsigned char buf[256];
    struct utsname u;
    put32(buf, PROTOCOL_VERSION);
    if (uname(&u) != 0)
        memset(&u, 0, sizeof u);
    int n = snprintf((char *)buf + 4, sizeof buf - 4, "%s %s %s %s", AGENT_NAME, u.sysname,
                     u.release, u.machine);
    send_frame(T_HELLO, 0, buf, 4 + (n > 0 ? (size_t)n : 0));
}

/* --- streams ------------------------------------------------------------------------ */
static struct stream *find_stream(uint32_t id)
{
    for (int i = 0; i < MAX_STREAMS; i++)
        if (streams[i].id == id)
            return &streams[i];
    return NULL;
}

static struct stream *new_stream(uint32_t id)
{
    if (id == 0 || find_stream(id)) {
        send_error(id, "stream %u is in use", id);
        return NULL;
    }
    struct stream *s = find_stream(0);
    if (!s) {
        send_error(id, "too many streams (%d)", MAX_STREAMS);
        return NULL;
    }
    memset(s, 0, sizeof *s);
    s->id = id;
    s->in_fd = s->out_fd = s->err_fd = s->file_fd = -1;
    return s;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void free_stream(struct stream *s)
{
    if (s->pty)
        s->out_fd = -1; /* the same descriptor as in_fd */
    close_fd(&s->in_fd);
    close_fd(&s->out_fd);
    close_fd(&s->err_fd);
    close_fd(&s->file_fd);
    if (s->tmp[0])
        unlink(s->tmp);
    s->id = 0;
}

/* An exec stream ends once its child is reaped and its output is drained. */
static void maybe_exit(struct stream *s)
{
    if (s->pid != 0 || s->out_fd >= 0 || s->err_fd >= 0)
        return;
    unsigned char b[4];
    put32(b, (uint32_t)s->status);
    send_frame(T_EXIT, s->id, b, 4);
    if (s->pty)
        s->in_fd = -1; /* closed with out_fd */
    free_stream(s);
}

static void set_winsize(int fd, unsigned rows, unsigned cols)
{
    struct winsize ws = {.ws_row = rows, .ws_col = cols};
    if (rows && cols)
        ioctl(fd, TIOCSWINSZ, &ws);
}

static void ensure_devpts(void)
{
    struct stat st;
    if (stat("/dev/pts/ptmx", &st) == 0)
        return;
    mkdir("/dev/pts", 0755);
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=666,gid=5,mode=620");
}

/* EXEC: u32 flags, u16 rows, u16 cols, argv strings, "", env strings, "", cwd string. */
static void do_exec(uint32_t id, const unsigned char *p, size_t len)
{
    if (len < 8) {
        send_error(id, "EXEC: short payload");
        return;
    }
    uint32_t flags = get32(p);
    unsigned rows = get16(p + 4), cols = get16(p + 6);
    const char *strs = (const char *)p + 8, *end = (const char *)p + len;
    char *argv[256], *envp[256], *cwd = NULL;
    int argc = 0, envc = 0, part = 0;
    static char copy[MAX_PAYLOAD + 1];
    size_t n = end - strs;
    if (n == 0 || strs[n - 1] != 0) {
        send_error(id, "EXEC: strings are not NUL-terminated");
        return;
    }
    memcpy(copy, strs, n);
    for (char *q = copy; q < copy + n; q += strlen(q) + 1) {
        if (part == 0) {
            if (!*q)
                part = 1;
            else if (argc < 255)
                argv[argc++] = q;
        } else if (part == 1) {
            if (!*q)
                part = 2;
            else if (envc < 255)
                envp[envc++] = q;
        } else if (!cwd && *q) {
            cwd = q;
        }
    }
    argv[argc] = NULL;
    if (argc == 0) {
        send_error(id, "EXEC: no command");
        return;
    }
    static char *defenv[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                             "HOME=/root", "TERM=xterm", NULL};
    char **env = envp;
    if (envc == 0)
        env = defenv;
    else
        envp[envc] = NULL;

    struct stream *s = new_stream(id);
    if (!s)
        return;
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, master = -1;
    int errp[2];
    if (pipe2(errp, O_CLOEXEC) != 0) {
        send_error(id, "pipe: %s", strerror(errno));
        free_stream(s);
        return;
    }
    pid_t pid;
    if (flags & EXEC_PTY) {
        ensure_devpts();
        struct winsize ws = {.ws_row = rows ? rows : 24, .ws_col = cols ? cols : 80};
        pid = forkpty(&master, NULL, NULL, &ws);
    } else {
        if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
            send_error(id, "pipe: %s", strerror(errno));
            close(errp[0]);
            close(errp[1]);
            free_stream(s);
            return;
        }
        pid = fork();
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        if (!(flags & EXEC_PTY)) {
            setsid();
            dup2(in[0], 0);
            dup2(out[1], 1);
            dup2(err[1], 2);
        }
        if (cwd && chdir(cwd) != 0) {
            int e = errno;
            (void)!write(errp[1], &e, sizeof e);
            _exit(127);
        }
        if (!cwd)
            (void)!chdir("/");
        execvpe(argv[0], argv, env);
        int e = errno;
        (void)!write(errp[1], &e, sizeof e);
        _exit(127);
    }
    close(errp[1]);
    if (!(flags & EXEC_PTY)) {
        close(in[0]);
        close(out[1]);
        close(err[1]);
    }
    if (pid < 0) {
        send_error(id, "fork: %s", strerror(errno));
        close(errp[0]);
        if (!(flags & EXEC_PTY)) {
            close(in[1]);
            close(out[0]);
            close(err[0]);
        }
        free_stream(s);
        return;
    }
    int e = 0;
    ssize_t r;
    while ((r = read(errp[0], &e, sizeof e)) < 0 && errno == EINTR)
        ;
    close(errp[0]);
    if (r == (ssize_t)sizeof e) { /* exec failed: reap it, report why */
        waitpid(pid, NULL, 0);
        if (!(flags & EXEC_PTY)) {
            close(in[1]);
            close(out[0]);
            close(err[0]);
        } else {
            close(master);
        }
        send_error(id, "%s: %s", cwd && e == ENOENT && access(cwd, F_OK) ? cwd : argv[0], strerror(e));
        free_stream(s);
        return;
    }
    s->pid = pid;
    if (flags & EXEC_PTY) {
        s->pty = 1;
        s->in_fd = s->out_fd = master;
        fcntl(master, F_SETFD, FD_CLOEXEC);
    } else {
        s->in_fd = in[1];
        s->out_fd = out[0];
        s->err_fd = err[0];
    }
    fcntl(s->in_fd, F_SETFL, fcntl(s->in_fd, F_GETFL) | O_NONBLOCK);
    unsigned char b[4];
    put32(b, (uint32_t)pid);
    send_frame(T_STARTED, id, b, 4);
}

static void do_stdin(struct stream *s, const unsigned char *p, size_t len)
{
    if (s->in_fd < 0)
        return;
    if (len == 0) { /* EOF */
        if (s->pty) {
            const char eot = 4; /* a terminal's EOF is ^D */
            (void)!write(s->in_fd, &eot, 1);
        } else {
            close_fd(&s->in_fd);
        }
        return;
    }
    /* Blocking writes would stall every stream; the host sends no more than a window. */
    int fl = fcntl(s->in_fd, F_GETFL);
    fcntl(s->in_fd, F_SETFL, fl & ~O_NONBLOCK);
    if (write_all(s->in_fd, p, len) != 0 && !s->pty)
        close_fd(&s->in_fd); /* the command stopped reading */
    fcntl(s->in_fd, F_SETFL, fl);
}

static void do_put(uint32_t id, const unsigned char *p, size_t len)
{
    if (len < 6 || p[len - 1] != 0 || len - 5 >= 4096) {
        send_error(id, "PUT: expected a mode and a NUL-terminated path under 4096 bytes");
        return;
    }
    struct stream *s = new_stream(id);
    if (!s)
        return;
    uint32_t mode = get32(p) & 07777;
    snprintf(s->path, sizeof s->path, "%s", (const char *)p + 4);
    snprintf(s->tmp, sizeof s->tmp, "%s.boite-tools.%d", s->path, (int)getpid());
    s->file_fd = open(s->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode ? mode : 0644);
    if (s->file_fd < 0) {
        s->tmp[0] = 0;
        send_error(id, "%s: %s", s->path, strerror(errno));
        free_stream(s);
    }
}

static void put_data(struct stream *s, const unsigned char *p, size_t len)
{
    if (len) {
        if (write_all(s->file_fd, p, len) != 0) {
            send_error(s->id, "%s: %s", s->path, strerror(errno));
            free_stream(s);
        }
        return;
    }
    /* End of the file: make it whole, then give it its name. */
    struct stat st;
    if (fsync(s->file_fd) != 0 || fstat(s->file_fd, &st) != 0 || rename(s->tmp, s->path) != 0) {
        send_error(s->id, "%s: %s", s->path, strerror(errno));
        free_stream(s);
        return;
    }
    s->tmp[0] = 0;
    unsigned char b[8];
    put32(b, (uint32_t)st.st_size);
    put32(b + 4, (uint32_t)((uint64_t)st.st_size >> 32));
    send_frame(T_OK, s->id, b, 8);
    free_stream(s);
}

static void do_get(uint32_t id, const unsigned char *p, size_t len)
{
    if (len < 2 || p[len - 1] != 0 || len - 1 >= 4096) {
        send_error(id, "GET: expected a NUL-terminated path under 4096 bytes");
        return;
    }
    struct stream *s = new_stream(id);
    if (!s)
        return;
    snprintf(s->path, sizeof s->path, "%s", (const char *)p);
    struct stat st;
    s->file_fd = open(s->path, O_RDONLY | O_CLOEXEC);
    if (s->file_fd < 0 || fstat(s->file_fd, &st) != 0) {
        send_error(id, "%s: %s", s->path, strerror(errno));
        free_stream(s);
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        send_error(id, "%s: is a directory", s->path);
        free_stream(s);
        return;
    }
    unsigned char b[12];
    put32(b, st.st_mode & 07777);
    put32(b + 4, (uint32_t)st.st_size);
    put32(b + 8, (uint32_t)((uint64_t)st.st_size >> 32));
    send_frame(T_FILEINFO, id, b, 12);
    s->get = 1; /* sent a chunk at a time from the main loop */
}

static void do_info(uint32_t id)
{
    char buf[4096];
    size_t n = 0;
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    struct utsname u;
    uname(&u);
    n += snprintf(buf + n, sizeof buf - n, "hostname=%s\nos=%s %s %s\nagent=%s\n", host,
                  u.sysname, u.release, u.machine, AGENT_NAME);
    FILE *f = fopen("/proc/uptime", "r");
    double up = 0;
    if (f) {
        if (fscanf(f, "%lf", &up) != 1)
            up = 0;
        fclose(f);
    }
    n += snprintf(buf + n, sizeof buf - n, "uptime=%.2f\n", up);
    struct ifaddrs *ifs, *i;
    if (getifaddrs(&ifs) == 0) {
        for (i = ifs; i && n < sizeof buf - 128; i = i->ifa_next) {
            if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET)
                continue;
            char a[INET_ADDRSTRLEN];
            inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, a, sizeof a);
            int prefix = 0;
            if (i->ifa_netmask)
                prefix = __builtin_popcount(((struct sockaddr_in *)i->ifa_netmask)->sin_addr.s_addr);
            n += snprintf(buf + n, sizeof buf - n, "ip=%s %s/%d\n", i->ifa_name, a, prefix);
        }
        freeifaddrs(ifs);
    }
    send_frame(T_INFO, id, buf, n);
}

static void do_time(uint32_t id, const unsigned char *p, size_t len)
{
    if (len != 12) {
        send_error(id, "TIME: expected 12 bytes");
        return;
    }
    struct timespec ts;
    ts.tv_sec = (time_t)((uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32);
    ts.tv_nsec = get32(p + 8) % 1000000000u;
    if (clock_settime(CLOCK_REALTIME, &ts) != 0)
        send_error(id, "clock_settime: %s", strerror(errno));
    else
        send_frame(T_OK, id, NULL, 0);
}

static void do_power(uint32_t id, const unsigned char *p, size_t len)
{
    uint32_t what = len >= 4 ? get32(p) : 0;
    const char *cmd = what == 1 ? poweroff_cmd : what == 2 ? reboot_cmd : NULL;
    if (!cmd) {
        send_error(id, "POWER: expected 1 (power off) or 2 (reboot)");
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        setsid();
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    if (pid < 0)
        send_error(id, "fork: %s", strerror(errno));
    else
        send_frame(T_OK, id, NULL, 0);
}

static void handle(int type, uint32_t id, const unsigned char *p, size_t len)
{
    struct stream *s = id ? find_stream(id) : NULL;
    switch (type) {
    case T_HELLO:
        send_hello();
        break;
    case T_PING:
        send_frame(T_PONG, id, p, len > 64 ? 64 : len);
        break;
    case T_EXEC:
        do_exec(id, p, len);
        break;
    case T_STDIN:
        if (s)
            do_stdin(s, p, len);
        break;
    case T_RESIZE:
        if (s && s->pty && len >= 4)
            set_winsize(s->in_fd, get16(p), get16(p + 2));
        break;
    case T_KILL:
        if (s && s->pid > 0 && len >= 4)
            if (kill(-s->pid, (int)get32(p)) != 0)
                kill(s->pid, (int)get32(p));
        break;
    case T_CLOSE:
        if (s) {
            if (s->pid > 0) {
                kill(-s->pid, SIGKILL);
                kill(s->pid, SIGKILL); /* reaped by reap(), never reported */
            }
            free_stream(s);
        }
        break;
    case T_PUT:
        do_put(id, p, len);
        break;
    case T_DATA:
        if (s && s->file_fd >= 0 && !s->get)
            put_data(s, p, len);
        break;
    case T_GET:
        do_get(id, p, len);
        break;
    case T_INFO:
        do_info(id);
        break;
    case T_TIME:
        do_time(id, p, len);
        break;
    case T_POWER:
        do_power(id, p, len);
        break;
    default:
        send_error(id, "unknown message type %d", type);
    }
}

/* --- the loop ----------------------------------------------------------------------- */
static void on_child(int sig)
{
    (void)sig;
    int saved = errno;
    (void)!write(child_pipe[1], "", 1);
    errno = saved;
}

static void reap(void)
{
    int ws;
    pid_t pid;
    while ((pid = waitpid(-1, &ws, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            if (s->id && s->pid == pid) {
                s->pid = 0;
                s->status = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
                maybe_exit(s);
            }
        }
    }
}

/* Read one output descriptor of a stream into a frame; EOF closes it. */
static void pump_output(struct stream *s, int *fd, int type)
{
    static unsigned char buf[CHUNK];
    ssize_t r = read(*fd, buf, sizeof buf);
    if (r < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    if (r <= 0) { /* EOF, or EIO from a PTY whose other side is gone */
        if (s->pty) {
            if (s->pid > 0)
                return; /* the child still runs: wait for it */
            close_fd(fd);
            s->in_fd = -1;
        } else {
            close_fd(fd);
        }
        maybe_exit(s);
        return;
    }
    send_frame(type, s->id, buf, (size_t)r);
}

static void pump_file(struct stream *s)
{
    static unsigned char buf[CHUNK];
    ssize_t r = read(s->file_fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR)
        return;
    if (r < 0) {
        send_error(s->id, "%s: %s", s->path, strerror(errno));
        free_stream(s);
        return;
    }
    send_frame(T_DATA, s->id, buf, (size_t)r);
    if (r == 0)
        free_stream(s);
}

static int find_port(char *out, size_t size)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    int found = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512], name[128] = "";
        if (strlen(e->d_name) > 200)
            continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f))
            name[strcspn(name, "\n")] = 0;
        fclose(f);
        if (strcmp(name, PORT_NAME) == 0) {
            snprintf(out, size, "/dev/%s", e->d_name);
            found = 1;
            break;
        }
    }
    if (d)
        closedir(d);
    return found;
}

static int serve_once;

/* A virtio console device offering MULTIPORT (feature bit 1) exists. */
static int multiport_present(void)
{
    DIR *d = opendir("/sys/bus/virtio/devices");
    struct dirent *e;
    int found = 0;
    while (d && !found && (e = readdir(d))) {
        if (e->d_name[0] == '.' || strlen(e->d_name) > 200)
            continue;
        char path[512], buf[128] = "";
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        int is_console = fgets(buf, sizeof buf, f) && strtol(buf, NULL, 0) == 3;
        fclose(f);
        if (!is_console)
            continue;
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/features", e->d_name);
        f = fopen(path, "r");
        if (f) {
            found = fgets(buf, sizeof buf, f) && buf[0] && buf[1] == '1';
            fclose(f);
        }
    }
    if (d)
        closedir(d);
    return found;
}
static char **saved_argv;

static void die_channel(const char *why)
{
    fprintf(stderr, "boite-tools: channel %s: %s\n", why, strerror(errno));
    for (int i = 0; i < MAX_STREAMS; i++)
        if (streams[i].id) {
            if (streams[i].pid > 0)
                kill(-streams[i].pid, SIGKILL);
            free_stream(&streams[i]);
        }
    if (serve_once)
        exit(1);
    close(chan);
    chan = -1;
    sleep(1);
    /* Start over with a fresh channel: re-exec ourselves (simplest complete reset). */
    extern char **environ;
    static char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = 0;
        execve(self, saved_argv, environ);
    }
    exit(1);
}

int main(int argc, char **argv)
{
    saved_argv = argv;
    const char *device = NULL;
    int fd = -1, opt, quiet = 0;
    while ((opt = getopt(argc, argv, "d:f:p:r:1q")) != -1) {
        switch (opt) {
        case 'q': quiet = 1; break;
        case 'd': device = optarg; break;
        case 'f': fd = atoi(optarg); break;
        case 'p': poweroff_cmd = optarg; break;
        case 'r': reboot_cmd = optarg; break;
        case '1': serve_once = 1; break;
        default:
            fprintf(stderr, "usage: %s [-d DEVICE | -f FD] [-p POWEROFF-CMD] [-r REBOOT-CMD] [-1] [-q]\n", argv[0]);
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    (void)!chdir("/"); /* relative paths in PUT/GET are relative to / */
    if (fd >= 0) {
        chan = fd;
    } else {
        char found[256];
        if (!device) {
            /* Linux adds the port a moment after the device (a control message exchange):
             * wait a little for it, but only where a multiport console device exists. */
            for (int i = 0; i < 50 && !find_port(found, sizeof found) && multiport_present(); i++) {
                struct timespec ts = {0, 100 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
            if (!find_port(found, sizeof found)) {
                if (!quiet)
                    fprintf(stderr, "boite-tools: no virtio port named %s (is this a boite box?)\n", PORT_NAME);
                return quiet ? 0 : 1;
            }
            device = found;
        }
        chan = open(device, O_RDWR | O_CLOEXEC);
        if (chan < 0) {
            fprintf(stderr, "boite-tools: %s: %s\n", device, strerror(errno));
            return 1;
        }
    }
    fcntl(chan, F_SETFL, fcntl(chan, F_GETFL) | O_NONBLOCK);
    if (pipe2(child_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
        return 1;
    struct sigaction sa = {0};
    sa.sa_handler = on_child;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    send_hello();

    static unsigned char in[HEADER + MAX_PAYLOAD];
    size_t have = 0;
    for (;;) {
        struct pollfd pfds[2 + 2 * MAX_STREAMS];
        struct stream *owner[2 + 2 * MAX_STREAMS];
        int kind[2 + 2 * MAX_STREAMS];
        int n = 0, sending = 0;
        pfds[n] = (struct pollfd){.fd = chan, .events = POLLIN};
        owner[n++] = NULL;
        pfds[n] = (struct pollfd){.fd = child_pipe[0], .events = POLLIN};
        owner[n++] = NULL;
        for (int i = 0; i < MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            if (!s->id)
                continue;
            if (s->get)
                sending = 1;
            if (s->out_fd >= 0) {
                pfds[n] = (struct pollfd){.fd = s->out_fd, .events = POLLIN};
                kind[n] = T_STDOUT;
                owner[n++] = s;
            }
            if (s->err_fd >= 0) {
                pfds[n] = (struct pollfd){.fd = s->err_fd, .events = POLLIN};
                kind[n] = T_STDERR;
                owner[n++] = s;
            }
        }
        int r = poll(pfds, n, sending ? 0 : -1);
        if (r < 0 && errno != EINTR)
            die_channel("poll");
        if (pfds[1].revents & POLLIN) {
            char drain[64];
            while (read(child_pipe[0], drain, sizeof drain) > 0)
                ;
        }
        reap();
        for (int i = 2; i < n; i++)
            if (owner[i]->id && (pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) {
                int *which = kind[i] == T_STDOUT ? &owner[i]->out_fd : &owner[i]->err_fd;
                if (*which == pfds[i].fd)
                    pump_output(owner[i], which, kind[i]);
            }
        for (int i = 0; i < MAX_STREAMS; i++)
            if (streams[i].id && streams[i].get)
                pump_file(&streams[i]);
        if (pfds[0].revents & (POLLHUP | POLLERR) && !(pfds[0].revents & POLLIN)) {
            /* A virtio port reports HUP while the host side is closed: wait for it. */
            if (fd >= 0)
                die_channel("hang-up");
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (!(pfds[0].revents & POLLIN))
            continue;
        ssize_t got = read(chan, in + have, sizeof in - have);
        if (got < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (got <= 0) {
            errno = got == 0 ? EPIPE : errno;
            if (fd >= 0 || got < 0)
                die_channel("read");
            continue; /* a virtio port reads 0 while the host is away */
        }
        have += (size_t)got;
        while (have >= HEADER) {
            uint32_t len = get32(in);
            if (len > MAX_PAYLOAD) {
                errno = EPROTO;
                die_channel("frame too long");
            }
            if (have < HEADER + len)
                break;
            handle(get16(in + 4), get32(in + 8), in + HEADER, len);
            memmove(in, in + HEADER + len, have - HEADER - len);
            have -= HEADER + len;
        }
    }
}
