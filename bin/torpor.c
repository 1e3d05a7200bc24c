/*
 * torpor's native launcher, installed as the `torpor` command.
 *
 * A Python process takes ~10 ms to start on the machines torpor targets, which is ~10 % of
 * restoring a 100 MiB process. When an agent serves this torpor home (`torpor agent start`),
 * this launcher hands the command to one of the agent's warm workers in about a millisecond
 * and waits for its exit code, exactly as the Python launcher `torpor-py` does
 * (the protocol is described there and implemented by torpor._agent._worker). In every other
 * case (no agent, `TORPOR_AGENT=off`, `torpor agent ...`, the agent declined) it executes
 * `torpor-py` from its own directory with the same arguments and TORPOR_AGENT_TRIED=1 in the
 * environment, which runs the command itself.
 *
 * Built by setup.py when torpor is installed (a failed build installs `torpor-py` under this
 * name instead). It links nothing but libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define PROTOCOL "torpor-agent/3"
#define MAX_PACKET (1 << 20)
#define READY_TIMEOUT 10 /* seconds for a worker to take the connection */

extern char **environ;

static volatile sig_atomic_t interrupts;

static void on_sigint(int sig) {
    (void)sig;
    interrupts++;
}

static char install[PATH_MAX]; /* the directory this executable is in */

static int find_install(void) {
    ssize_t n = readlink("/proc/self/exe", install, sizeof install - 16);
    if (n <= 0)
        return -1;
    install[n] = '\0';
    char *slash = strrchr(install, '/');
    if (!slash)
        return -1;
    *slash = '\0';
    return 0;
}

/* Run the command with the Python launcher beside this executable. */
static int fallback(char **argv) {
    char path[PATH_MAX + 16];
    if (!install[0] && find_install()) {
        fprintf(stderr, "torpor: error: cannot find this launcher's directory: %s\n",
                strerror(errno));
        return 127;
    }
    snprintf(path, sizeof path, "%s/torpor-py", install);
    setenv("TORPOR_AGENT_TRIED", "1", 1);
    execv(path, argv);
    int err = errno;
    fprintf(stderr, "torpor: error: cannot run %s: %s — reinstall torpor\n", path, strerror(err));
    return 127;
}

/* Whether the command may go to an agent (the rule of torpor-py's wants_agent). */
static int wants_agent(int argc, char **argv) {
    const char *mode = getenv("TORPOR_AGENT");
    if (mode && (!strcasecmp(mode, "0") || !strcasecmp(mode, "off") || !strcasecmp(mode, "no") ||
                 !strcasecmp(mode, "false")))
        return 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--"))
            break;
        if (argv[i][0] != '-')
            return strcmp(argv[i], "agent") != 0;
    }
    return 1;
}

/* The torpor home, by the rule of torpor._paths.home (without creating it). */
static int home_socket(char *out, size_t size) {
    const char *home = getenv("TORPOR_HOME");
    int n;
    if (home && *home) {
        n = snprintf(out, size, "%s/agent.sock", home);
    } else if (geteuid() == 0) {
        n = snprintf(out, size, "/var/lib/torpor/agent.sock");
    } else {
        const char *xdg = getenv("XDG_DATA_HOME");
        const char *user = getenv("HOME");
        if (xdg && *xdg)
            n = snprintf(out, size, "%s/torpor/agent.sock", xdg);
        else
            n = snprintf(out, size, "%s/.local/share/torpor/agent.sock", user ? user : "");
    }
    return n > 0 && (size_t)n < size ? 0 : -1;
}

/* Append `len` bytes and a NUL separator (none before the first field). */
static int put(char *buf, size_t *used, const char *data, size_t len) {
    if (*used + len + 1 > MAX_PACKET)
        return -1;
    if (*used)
        buf[(*used)++] = '\0';
    memcpy(buf + *used, data, len);
    *used += len;
    return 0;
}

static int put_str(char *buf, size_t *used, const char *s) {
    return put(buf, used, s, strlen(s));
}

static int encode_request(char *buf, size_t *used, int argc, char **argv) {
    char cwd[PATH_MAX], num[64];
    if (!getcwd(cwd, sizeof cwd))
        return -1;
    mode_t mask = umask(022);
    umask(mask);
    if (put_str(buf, used, PROTOCOL) || put_str(buf, used, install) || put_str(buf, used, cwd))
        return -1;
    snprintf(num, sizeof num, "%o", (unsigned)mask);
    if (put_str(buf, used, num))
        return -1;
    /* Resource limits: RESOURCE:SOFT:HARD, comma-separated; -1 is unlimited (as in Python). */
    char limits[RLIM_NLIMITS * 48] = "";
    size_t at = 0;
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit lim;
        if (getrlimit(r, &lim))
            continue;
        long long soft = lim.rlim_cur == RLIM_INFINITY ? -1 : (long long)lim.rlim_cur;
        long long hard = lim.rlim_max == RLIM_INFINITY ? -1 : (long long)lim.rlim_max;
        int n = snprintf(limits + at, sizeof limits - at, "%s%d:%lld:%lld", at ? "," : "", r,
                         soft, hard);
        if (n < 0 || (size_t)n >= sizeof limits - at)
            return -1;
        at += (size_t)n;
    }
    if (put_str(buf, used, limits))
        return -1;
    snprintf(num, sizeof num, "%d", argc - 1);
    if (put_str(buf, used, num))
        return -1;
    for (int i = 1; i < argc; i++)
        if (put_str(buf, used, argv[i]))
            return -1;
    for (char **e = environ; *e; e++)
        if (put_str(buf, used, *e))
            return -1;
    return 0;
}

/* Whether the process listening on `sock` runs as our effective user (SO_PEERCRED): only then
 * is it an agent of ours. Anyone who could create agent.sock in a home that is not private
 * would otherwise get our stdin/stdout/stderr and environment (a root terminal). */
static int ours(int sock) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    return !getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) && len == sizeof cred &&
           cred.uid == geteuid();
}

/* Hand the command to the agent: its exit code, or -1 if nothing reached a worker. */
static int via_agent(int argc, char **argv) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (home_socket(addr.sun_path, sizeof addr.sun_path) || find_install())
        return -1;
    /* The request is ready before we connect: the worker waits for nothing after `ready`. */
    char *packet = malloc(MAX_PACKET);
    size_t used = 0;
    if (!packet || encode_request(packet, &used, argc, argv)) {
        free(packet);
        return -1;
    }
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0) {
        free(packet);
        return -1;
    }
    /* A worker says `ready` once it has taken the connection; a reset or EOF before that (the
     * agent stopping, or no worker coming) means nothing ran. A full backlog blocks connect. */
    struct timeval wait = {.tv_sec = READY_TIMEOUT};
    char ready[16];
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &wait, sizeof wait);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) || !ours(sock) ||
        recv(sock, ready, sizeof ready, 0) != 5 || memcmp(ready, "ready", 5)) {
        free(packet);
        close(sock);
        return -1;
    }
    wait.tv_sec = 0;
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &wait, sizeof wait);
    /* Our fds 0, 1, 2 and our working directory itself: a path could be renamed meanwhile. */
    int here = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (here < 0) {
        free(packet);
        close(sock);
        return -1;
    }
    int fds[4] = {0, 1, 2, here};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = packet, .iov_len = used};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control,
        .msg_controllen = sizeof control,
    };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    close(here);
    free(packet);
    if (sent < 0) { /* a closed stdio fd, a request too big for one packet, ... */
        close(sock);
        return -1;
    }

    /* Ctrl-C: forwarded once; a second one stops waiting. An ignored SIGINT (a background
     * job of a script) stays ignored, as it would in-process. */
    struct sigaction old;
    sigaction(SIGINT, NULL, &old);
    if (old.sa_handler != SIG_IGN) {
        struct sigaction sa = {.sa_handler = on_sigint};
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, NULL); /* no SA_RESTART: recv returns EINTR */
    }
    /* SIGINT stays blocked except inside ppoll, so one cannot slip in between the check of
     * `interrupts` and the wait (it would then wait unforwarded). */
    sigset_t block, orig_mask, unblocked;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &orig_mask);
    unblocked = orig_mask;
    sigdelset(&unblocked, SIGINT);
    char reply[4096];
    ssize_t n = -1;
    int forwarded = 0;
    for (;;) {
        if (interrupts > 1) {
            close(sock);
            return 130;
        }
        if (interrupts && !forwarded) {
            forwarded = 1;
            send(sock, "interrupt", 9, MSG_NOSIGNAL);
        }
        struct pollfd wait_reply = {.fd = sock, .events = POLLIN};
        if (ppoll(&wait_reply, 1, NULL, &unblocked) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        n = recv(sock, reply, sizeof reply - 1, MSG_DONTWAIT);
        if (n >= 0 || (errno != EINTR && errno != EAGAIN))
            break;
    }
    close(sock);
    /* torpor-py may run next (a decline): it gets Ctrl-C as we got it. */
    sigaction(SIGINT, &old, NULL);
    sigprocmask(SIG_SETMASK, &orig_mask, NULL);
    if (n < 0)
        n = 0;
    reply[n] = '\0';
    if (!strncmp(reply, "declined:", 9))
        return -1;
    if (!strncmp(reply, "exit:", 5))
        return atoi(reply + 5) & 0xff;
    const char *home = getenv("TORPOR_HOME");
    fprintf(stderr,
            "torpor: error: the agent's worker ended before the command finished — see "
            "%s/logs/agent.log\n",
            home && *home ? home : "the torpor home");
    return 1;
}

int main(int argc, char **argv) {
    if (wants_agent(argc, argv)) {
        int code = via_agent(argc, argv);
        if (code >= 0)
            return code;
    }
    return fallback(argv);
}
