/* What the stats of a no-op build cost by themselves, without pipe: one fstatat per path, in the
 * order given, relative to the current folder (as pipe stats the skip memo's watched paths
 * relative to the project folder), and the same number of fstatat calls of one path (the system
 * call's own cost, without the lookups).
 *
 *     cc -O2 -o /tmp/stat_floor bench/stat_floor.c
 *     cd WORKLOAD && python3 -c "import json; print('\n'.join(json.load(open('cache/skip-v1.json'))['paths']))" > /tmp/paths.txt
 *     /tmp/stat_floor /tmp/paths.txt [ROUNDS]
 *
 * Prints, per round, the milliseconds of all the stats on one thread, and the cost per stat.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PATHS_FILE [ROUNDS]\n", argv[0]);
        return 2;
    }
    int rounds = argc > 2 ? atoi(argv[2]) : 5;
    FILE *f = fopen(argv[1], "r");
    if (!f) {
        perror(argv[1]);
        return 1;
    }
    size_t n = 0, cap = 1024;
    char **paths = malloc(cap * sizeof *paths);
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (!*line)
            continue;
        if (n == cap)
            paths = realloc(paths, (cap *= 2) * sizeof *paths);
        paths[n++] = strdup(line);
    }
    fclose(f);
    if (n == 0) {
        fprintf(stderr, "no paths in %s\n", argv[1]);
        return 1;
    }
    struct stat st;
    for (int r = 0; r < rounds; r++) {
        double t = now_ms();
        size_t absent = 0;
        for (size_t i = 0; i < n; i++)
            absent += fstatat(AT_FDCWD, paths[i], &st, 0) != 0;
        double all = now_ms() - t;
        t = now_ms();
        for (size_t i = 0; i < n; i++)
            fstatat(AT_FDCWD, paths[0], &st, 0);
        double same = now_ms() - t;
        printf("%zu paths (%zu absent): %.1f ms, %.2f us each; %zu stats of one path: %.1f ms, %.2f us each\n",
               n, absent, all, all * 1e3 / n, n, same, same * 1e3 / n);
    }
    return 0;
}
