# Turns the usage example at the top of include/pagedvl.h into a program, so
# the header's first lesson is compiled and run like any other test instead
# of rotting. The text between the two marker lines is the body of a
# function returning int; this adds the buffers it names (zeroed f16 data,
# larger than the shapes its comment states).
#
#   cmake -DHEADER=include/pagedvl.h -DOUT=header_example.c -P this file
cmake_minimum_required(VERSION 3.22)
if(NOT HEADER OR NOT OUT)
  message(FATAL_ERROR "usage: cmake -DHEADER=... -DOUT=... -P ${CMAKE_CURRENT_LIST_FILE}")
endif()
# Whole-file string operations, not file(STRINGS): a list of lines would
# split the code's semicolons.
file(READ "${HEADER}" text)
set(begin_marker "\n * ---- usage example begin ----\n")
set(end_marker "\n * ---- usage example end ----\n")
string(FIND "${text}" "${begin_marker}" b)
string(FIND "${text}" "${end_marker}" e)
if(b LESS 0 OR e LESS 0 OR e LESS b)
  message(FATAL_ERROR "${HEADER}: no '---- usage example begin ----' ... "
                      "'---- usage example end ----' block in a comment")
endif()
string(LENGTH "${begin_marker}" blen)
math(EXPR from "${b} + ${blen} - 1")
math(EXPR len "${e} - ${from}")
string(SUBSTRING "${text}" ${from} ${len} body)
# "\n *   code" -> "\n  code"; an empty comment line "\n *" -> "\n"
string(REGEX REPLACE "\n \\*" "\n" body "${body}")
file(WRITE "${OUT}" "/* Generated from ${HEADER} by tests/header_example.cmake. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include \"pagedvl.h\"

enum { MAX_LAYERS = 128 };

static int example(const void *const *k, const void *const *v,
                   const void *const *k_new, const void *const *v_new,
                   const void *const *q, void *const *out, int n_steps) {
${body}
}

int main(void) {
  /* A 4096-token prompt and 64 heads of head_dim 128 in 2-byte elements:
   * more than the example asks for. Every layer reads the same zeroed
   * data; the outputs are per layer. */
  const size_t prompt_bytes = (size_t)4096 * 64 * 128 * 2;
  const size_t row_bytes = (size_t)64 * 128 * 2;
  void *prompt = calloc(1, prompt_bytes), *row = calloc(1, row_bytes);
  void *outbuf = calloc(MAX_LAYERS, row_bytes);
  const void *k[MAX_LAYERS], *v[MAX_LAYERS], *k_new[MAX_LAYERS],
      *v_new[MAX_LAYERS], *q[MAX_LAYERS];
  void *out[MAX_LAYERS];
  int rc = 1;
  if (prompt && row && outbuf) {
    for (int l = 0; l < MAX_LAYERS; l++) {
      k[l] = v[l] = prompt;
      k_new[l] = v_new[l] = q[l] = row;
      out[l] = (char *)outbuf + (size_t)l * row_bytes;
    }
    rc = example(k, v, k_new, v_new, q, out, 20);
    if (rc == 0) printf(\"header usage example: OK\\n\");
  }
  free(prompt);
  free(row);
  free(outbuf);
  return rc;
}
")
