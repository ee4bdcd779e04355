/* capture.h -- runs a program with its stderr captured, into a pipe or onto
 * a pseudo-terminal, for the tests of what long commands draw on a
 * terminal (client/progress.h): the progress line must be there on a
 * terminal and not a byte of it anywhere else. Test-only: static inline
 * functions; the caller includes cmocka first.
 */
#ifndef VQKV_TEST_CAPTURE_H
#define VQKV_TEST_CAPTURE_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

/* Appends what fd has now to out[*n] (keeping out NUL-terminated within
 * len, dropping the rest); false at end of file or on an error (EIO: a
 * pseudo-terminal's master with no slave left). */
static inline bool capture_drain(int fd, char *out, size_t len, size_t *n)
{
    for (;;) {
        char buf[4096];
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return true;
        if (r <= 0)
            return false;
        size_t keep = (size_t)r < len - 1 - *n ? (size_t)r : len - 1 - *n;
        memcpy(out + *n, buf, keep);
        *n += keep;
        out[*n] = '\0';
    }
}

/* Runs argv[0] with argv, stdin and stdout on /dev/null and stderr into
 * out[len] (NUL-terminated, cut at len - 1): through a pipe, or with tty
 * on the slave side of a new pseudo-terminal of 200 columns with output
 * processing off (so out holds the bytes exactly as written, no "\n" made
 * "\r\n"). Returns the exit status, 128 + the signal if one ended it. */
static inline int capture_run(const char *const *argv, bool tty, char *out, size_t len)
{
    int rd = -1, wr = -1;
    if (tty) {
        rd = posix_openpt(O_RDWR | O_NOCTTY);
        assert_true(rd >= 0);
        assert_int_equal(grantpt(rd), 0);
        assert_int_equal(unlockpt(rd), 0);
        const char *name = ptsname(rd);
        assert_non_null(name);
        /* Held open here until the child is gone, so the master never
         * reads EIO while it still has bytes to hand over. */
        wr = open(name, O_RDWR | O_NOCTTY);
        assert_true(wr >= 0);
        struct termios t;
        assert_int_equal(tcgetattr(wr, &t), 0);
        t.c_oflag &= ~(tcflag_t)OPOST;
        assert_int_equal(tcsetattr(wr, TCSANOW, &t), 0);
        struct winsize ws = {.ws_row = 24, .ws_col = 200};
        assert_int_equal(ioctl(wr, TIOCSWINSZ, &ws), 0);
    } else {
        int p[2];
        assert_int_equal(pipe(p), 0);
        rd = p[0];
        wr = p[1];
    }
    assert_int_equal(fcntl(rd, F_SETFL, fcntl(rd, F_GETFL) | O_NONBLOCK), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(wr, 2) < 0)
            _exit(127);
        if (null > 2)
            close(null);
        if (wr > 2)
            close(wr);
        close(rd);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    if (!tty) {
        close(wr); /* the pipe ends when the child's copy closes */
        wr = -1;
    }
    size_t n = 0;
    out[0] = '\0';
    int status = 0;
    bool open_ = true;
    for (;;) {
        struct pollfd pfd = {.fd = rd, .events = POLLIN};
        if (open_ && poll(&pfd, 1, 50) > 0)
            open_ = capture_drain(rd, out, len, &n);
        pid_t w = waitpid(pid, &status, open_ ? WNOHANG : 0);
        assert_true(w == 0 || w == pid);
        if (w == pid)
            break;
    }
    /* What the child wrote before it exited: a pseudo-terminal hands it
     * over asynchronously, so until the master has been quiet a while. */
    struct pollfd pfd = {.fd = rd, .events = POLLIN};
    while (open_ && poll(&pfd, 1, 200) > 0)
        open_ = capture_drain(rd, out, len, &n);
    close(rd);
    if (wr >= 0)
        close(wr);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Fails naming what was captured when out holds a '\r': no progress line
 * (nor any redraw) may reach a pipe or a file. */
static inline void capture_assert_no_progress(const char *what, const char *out)
{
    if (strchr(out, '\r') != NULL)
        fail_msg("%s wrote a progress line to a stderr that is no terminal:\n%s", what, out);
}

/* Fails unless out has a progress line "\r  ...ETA ..." holding every one
 * of the NULL-terminated words, and ends with that line erased ('\r',
 * nothing but spaces, '\r'), so what follows starts on a clean line. */
static inline void capture_assert_progress(const char *what, const char *out,
                                           const char *const *words)
{
    const char *line = strstr(out, "\r  ");
    if (line == NULL || strstr(line, ", ETA ") == NULL)
        fail_msg("%s drew no progress line with an ETA on a terminal:\n%s", what, out);
    for (size_t i = 0; words[i] != NULL; i++)
        if (strstr(line, words[i]) == NULL)
            fail_msg("%s's progress line lacks \"%s\":\n%s", what, words[i], out);
    size_t n = strlen(out);
    const char *last = n > 0 ? out + n - 1 : out;
    if (n < 2 || *last != '\r')
        fail_msg("%s left its progress line on the terminal:\n%s", what, out);
    const char *p = last - 1;
    while (p > out && *p == ' ')
        p--;
    if (*p != '\r' || p == last - 1)
        fail_msg("%s did not blank its progress line at the end:\n%s", what, out);
}

#endif
