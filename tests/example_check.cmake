# Runs examples/batched_decode with --json and checks that its totals add
# up: admission with compression is never worse than without, the blocks in
# use at the end are exactly the lifetime blocks the example reserved, the
# report's block counts agree with each other and with the pool, and the
# token counts follow from requests x steps and the kept prompt tokens.
#
#   cmake -DEXE=path/to/batched_decode "-DARGS=--policy full ..." -P this file
cmake_minimum_required(VERSION 3.22)
if(NOT EXE)
  message(FATAL_ERROR "usage: cmake -DEXE=... [-DARGS=...] -P ${CMAKE_CURRENT_LIST_FILE}")
endif()
separate_arguments(args UNIX_COMMAND "${ARGS}")
execute_process(COMMAND "${EXE}" --backend cpu --json ${args}
  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "batched_decode ${ARGS} exited with ${rc}:\n${err}${out}")
endif()

function(fail what)
  message(FATAL_ERROR "batched_decode ${ARGS}: ${what}\n${out}")
endfunction()
# check(<a> <op> <b> what): integer comparison, op EQUAL/LESS/GREATER/...
function(check a op b what)
  if(NOT a ${op} b)
    fail("${what}: ${a} ${op} ${b} does not hold")
  endif()
endfunction()

foreach(key layers pool_blocks n_prompt steps prompt_blocks life_blocks)
  string(JSON ${key} GET "${out}" ${key})
endforeach()
string(JSON bs GET "${out}" block_size)
math(EXPR expect_prompt_blocks "${layers} * ((${n_prompt} + ${bs} - 1) / ${bs})")
math(EXPR expect_life_blocks
  "${layers} * ((${n_prompt} + ${steps} + ${bs} - 1) / ${bs})")
check(${prompt_blocks} EQUAL ${expect_prompt_blocks} "prompt_blocks")
check(${life_blocks} EQUAL ${expect_life_blocks} "life_blocks")

string(JSON n_runs LENGTH "${out}" runs)
if(ARGS MATCHES "--policy[ =]none")
  check(${n_runs} EQUAL 1 "runs with --policy none")
else()
  check(${n_runs} EQUAL 2 "runs: none, then the policy")
endif()
math(EXPR last "${n_runs} - 1")
foreach(i RANGE ${last})
  foreach(key policy requests stopped_by compressed not_compressed
          prompt_tokens decode_tokens kept_tokens blocks_before blocks_after
          blocks_freed blocks_taken net_saved reserved peak_used final_used
          final_free final_tokens)
    string(JSON ${key} GET "${out}" runs ${i} ${key})
  endforeach()
  set(ctx "run ${i} (${policy})")
  check(${requests} GREATER 0 "${ctx}: requests")
  math(EXPR v "${requests} * ${n_prompt}")
  check(${prompt_tokens} EQUAL ${v} "${ctx}: prompt tokens = requests x prompt")
  math(EXPR v "${requests} * ${steps}")
  check(${decode_tokens} EQUAL ${v} "${ctx}: decode tokens = requests x steps")
  # The pool: every block is in use or free; the end state is exactly what
  # admission reserved; the peak is at least the end and within the pool.
  math(EXPR v "${final_used} + ${final_free}")
  check(${v} EQUAL ${pool_blocks} "${ctx}: used + free = pool")
  check(${final_used} EQUAL ${reserved} "${ctx}: blocks in use at the end = reserved")
  check(${peak_used} GREATER_EQUAL ${final_used} "${ctx}: peak >= end")
  check(${peak_used} LESS_EQUAL ${pool_blocks} "${ctx}: peak <= pool")
  # Admission stopped for a reason: the next request would not have fit.
  if(stopped_by MATCHES "pool full")
    math(EXPR v "${reserved} + ${life_blocks}")
    check(${v} GREATER ${pool_blocks} "${ctx}: stopped (${stopped_by}) although another request fits")
  endif()
  # Compression: the sequences' saving equals the pool's net gain (no
  # forks here), and it is what blocks_before - blocks_after says.
  math(EXPR v "${blocks_before} - ${blocks_after}")
  check(${net_saved} EQUAL ${v} "${ctx}: net saved = before - after")
  math(EXPR v "${blocks_freed} - ${blocks_taken}")
  check(${net_saved} EQUAL ${v} "${ctx}: net saved = freed - taken")
  math(EXPR v "${compressed} * ${prompt_blocks}")
  check(${blocks_before} EQUAL ${v} "${ctx}: blocks before = compressed x prompt blocks")
  # Tokens held at the end: every prompt token of the uncompressed requests,
  # the kept ones of the compressed, and every decode token, in each layer.
  math(EXPR v "${layers} * ((${requests} - ${compressed}) * ${n_prompt} + ${requests} * ${steps}) + ${kept_tokens}")
  check(${final_tokens} EQUAL ${v} "${ctx}: tokens at the end")
  if(i EQUAL 0)
    check("${policy}" STREQUAL "none" "run 0 is the one without compression")
    check(${compressed} EQUAL 0 "${ctx}: compressed")
    math(EXPR v "${requests} * ${life_blocks}")
    check(${final_used} EQUAL ${v} "${ctx}: end = requests x lifetime blocks")
    set(none_requests ${requests})
  else()
    math(EXPR v "${compressed} + ${not_compressed}")
    check(${v} EQUAL ${requests} "${ctx}: compressed + not compressed = requests")
    check(${requests} GREATER_EQUAL ${none_requests}
          "${ctx}: admitted fewer requests than without compression")
    # --keep applies to the compared policy, also when --policy is not given.
    if(ARGS MATCHES "--keep[ =]([0-9.]+)")
      set(keep_asked ${CMAKE_MATCH_1})
      # From the text, as printed (string(JSON) would reformat the float).
      string(REGEX MATCHALL "\"keep_ratio\": [0-9.e+-]+" ratios "${out}")
      list(GET ratios ${i} keep_ratio)
      string(REGEX REPLACE ".* " "" keep_ratio "${keep_ratio}")
      check("${keep_ratio}" STREQUAL "${keep_asked}" "${ctx}: keep ratio")
    endif()
  endif()
endforeach()
message(STATUS "batched_decode ${ARGS}: the totals add up")
