/* libvqkv_harness.h -- what the tests that drive vqkvd through libvqkv
 * (test_libvqkv.c, test_tenants.c, test_limits.c, test_load.c,
 * test_faults.c, test_service.c) share on top of daemon_harness.h:
 * libvqkv's header and the assert on its codes (assert_vqkv, test_assert.h),
 * running vqkvctl (VQKVCTL_PATH) with its stdout captured, and running a
 * check as another uid (root only). Test-only, static functions.
 */
#ifndef VQKV_LIBVQKV_HARNESS_H
#define VQKV_LIBVQKV_HARNESS_H

#include <grp.h>
#include <sys/wait.h>

#include "daemon_harness.h"
#include "test_assert.h" /* assert_vqkv */
#include "vqkv.h"

/* Runs vqkvctl with args (NULL-terminated) and returns its exit status;
 * its stdout goes into out (NUL-terminated, truncated to size). */
static inline int run_ctl(const char *const *args, char *out, size_t size)
{
    const char *argv[24] = {VQKVCTL_PATH};
    size_t n = 1;
    for (size_t i = 0; args[i] != NULL && n < 23; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    int pipefd[2];
    assert_int_equal(pipe(pipefd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(pipefd[1], STDOUT_FILENO);
        close(pipefd[0]);
        close(pipefd[1]);
        execv(VQKVCTL_PATH, (char *const *)argv);
        _exit(127);
    }
    close(pipefd[1]);
    size_t got = 0;
    for (;;) {
        ssize_t r = read(pipefd[0], out + got, size - 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
        if (got == size - 1)
            break;
    }
    out[got] = '\0';
    close(pipefd[0]);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Lets every uid reach d's socket (its directory searchable, the socket
 * 0666), so that the daemon's allow list, not the file mode, decides which
 * peers are served. */
static inline void daemon_open_to_all(const daemon_t *d)
{
    assert_int_equal(chmod(d->dir, 0711), 0);
    assert_int_equal(chmod(d->path, 0666), 0);
}

/* Runs fn(arg) in a child process as uid and gid (no supplementary
 * groups; needs root) and returns its exit status: cmocka's asserts do not
 * cross a fork, so fn reports the first check that failed as its status
 * (0: all held; 100: the ids could not be taken). */
static inline int run_as(uid_t uid, gid_t gid, int (*fn)(const void *arg), const void *arg)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (setgroups(0, NULL) != 0 || setresgid(gid, gid, gid) != 0 ||
            setresuid(uid, uid, uid) != 0)
            _exit(100);
        _exit(fn(arg));
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    return WEXITSTATUS(status);
}

#endif
