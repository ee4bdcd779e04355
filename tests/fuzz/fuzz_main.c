/* fuzz_main.c -- a plain main() for the fuzz targets: runs
 * LLVMFuzzerTestOneInput once over every file named on the command line or
 * found in a directory named there (not recursively; names starting with a
 * dot are skipped, so a directory can hold a .gitkeep). It is what ctest
 * runs in every build, libFuzzer or not, so the seed corpus and every crash
 * input kept under regressions/ are replayed forever. A failed invariant
 * aborts (a non-zero status for ctest); a missing path is an error, an
 * empty directory is not.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

/* Defined by targets that need one-time set-up. */
__attribute__((weak)) int LLVMFuzzerInitialize(int *argc, char ***argv);

static int fuzz__run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    uint8_t *data = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? 2 * cap : 4096;
            uint8_t *grown = realloc(data, cap);
            if (grown == NULL) {
                fclose(f);
                free(data);
                fprintf(stderr, "%s: out of memory\n", path);
                return -1;
            }
            data = grown;
        }
        size_t n = fread(data + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(data);
        fprintf(stderr, "%s: read error\n", path);
        return -1;
    }
    /* An exact-size copy, so ASan sees a read past the input as one. */
    uint8_t *input = malloc(len ? len : 1);
    if (input == NULL) {
        free(data);
        return -1;
    }
    memcpy(input, data, len);
    free(data);
    LLVMFuzzerTestOneInput(input, len);
    free(input);
    return 0;
}

static int fuzz__name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Runs every file of dir in name order (so runs are repeatable); returns
 * how many, or -1. */
static int fuzz__run_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        fprintf(stderr, "%s: %s\n", dir, strerror(errno));
        return -1;
    }
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    for (struct dirent *e = readdir(d); e != NULL; e = readdir(d)) {
        if (e->d_name[0] == '.')
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **grown = realloc(names, cap * sizeof *names);
            if (grown == NULL) {
                rc = -1;
                break;
            }
            names = grown;
        }
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        if ((names[n] = malloc(len)) == NULL) {
            rc = -1;
            break;
        }
        snprintf(names[n++], len, "%s/%s", dir, e->d_name);
    }
    closedir(d);
    if (rc == 0 && n > 0)
        qsort(names, n, sizeof *names, fuzz__name_cmp);
    for (size_t i = 0; i < n; i++) {
        if (rc == 0 && fuzz__run_file(names[i]) < 0)
            rc = -1;
        free(names[i]);
    }
    free(names);
    return rc < 0 ? -1 : (int)n;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE_OR_DIR...\n", argv[0]);
        return 2;
    }
    if (LLVMFuzzerInitialize != NULL)
        LLVMFuzzerInitialize(&argc, &argv);
    int total = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) < 0) {
            fprintf(stderr, "%s: %s\n", argv[i], strerror(errno));
            return 1;
        }
        int n = S_ISDIR(st.st_mode)            ? fuzz__run_dir(argv[i])
                : fuzz__run_file(argv[i]) == 0 ? 1
                                               : -1;
        if (n < 0)
            return 1;
        printf("%s: %d input%s\n", argv[i], n, n == 1 ? "" : "s");
        total += n;
    }
    printf("%d inputs replayed, every invariant held\n", total);
    return 0;
}
