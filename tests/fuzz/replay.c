/* Replays fuzzer inputs without libFuzzer: runs LLVMFuzzerTestOneInput on
 * every file named on the command line, or found (one level deep) in a
 * directory named there. Built in every configuration, so the checked-in
 * corpus runs under gcc, the sanitizer build and valgrind alike; a crash or
 * a failed check aborts, which fails the ctest test. Exits 1 if no input
 * was found, so a corpus that silently vanished is a failure too. */
#define _POSIX_C_SOURCE 200809L /* posix_memalign, clock_gettime, dirent */

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    perror(path);
    return -1;
  }
  uint8_t *buf = NULL;
  size_t len = 0, cap = 0;
  for (;;) {
    if (len == cap) {
      cap = cap ? 2 * cap : 4096;
      uint8_t *nb = realloc(buf, cap);
      if (!nb) {
        fclose(f);
        free(buf);
        return -1;
      }
      buf = nb;
    }
    size_t got = fread(buf + len, 1, cap - len, f);
    len += got;
    if (got == 0) break;
  }
  fclose(f);
  LLVMFuzzerTestOneInput(buf, len);
  free(buf);
  return 0;
}

static int cmp(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Runs the files of a directory in name order (a stable replay order). */
static long run_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) {
    perror(dir);
    return -1;
  }
  char **names = NULL;
  size_t n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.') continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 64;
      char **nn = realloc(names, cap * sizeof(char *));
      if (!nn) break;
      names = nn;
    }
    size_t l = strlen(dir) + strlen(e->d_name) + 2;
    names[n] = malloc(l);
    if (!names[n]) break;
    snprintf(names[n], l, "%s/%s", dir, e->d_name);
    n++;
  }
  closedir(d);
  if (n) qsort(names, n, sizeof(char *), cmp);
  long ran = 0;
  for (size_t i = 0; i < n; i++) {
    struct stat st;
    if (stat(names[i], &st) == 0 && S_ISREG(st.st_mode) &&
        run_file(names[i]) == 0)
      ran++;
    free(names[i]);
  }
  free(names);
  return ran;
}

int main(int argc, char **argv) {
  long ran = 0;
  for (int i = 1; i < argc; i++) {
    struct stat st;
    if (stat(argv[i], &st) != 0) {
      perror(argv[i]);
      return 1;
    }
    if (S_ISDIR(st.st_mode)) {
      long r = run_dir(argv[i]);
      if (r < 0) return 1;
      ran += r;
    } else if (run_file(argv[i]) == 0) {
      ran++;
    } else {
      return 1;
    }
  }
  printf("replayed %ld inputs\n", ran);
  return ran > 0 ? 0 : 1;
}
