/* The emulated launchers get names of their own, so a test binary can link
 * them next to a library built with the real kernels. Included first by
 * every emulator translation unit and by the tests. */
#ifndef PVL_EMU_NAMES_H
#define PVL_EMU_NAMES_H
#define pvlk_plan_scatter pvl_emu_plan_scatter
#define pvlk_kv_write_range pvl_emu_kv_write_range
#define pvlk_kv_read_range pvl_emu_kv_read_range
#define pvlk_plan_kv_write pvl_emu_plan_kv_write
#define pvlk_copy_blocks pvl_emu_copy_blocks
#define pvlk_gather_slots pvl_emu_gather_slots
#define pvlk_attention_workspace_bytes pvl_emu_attention_workspace_bytes
#define pvlk_attention_decode pvl_emu_attention_decode
#define pvlk_observe_workspace_bytes pvl_emu_observe_workspace_bytes
#define pvlk_observe pvl_emu_observe
#define pvlk_select_workspace_bytes pvl_emu_select_workspace_bytes
#define pvlk_select_top pvl_emu_select_top
#define pvlk_observe_accumulate pvl_emu_observe_accumulate
#define pvlk_last_cuda_error pvl_emu_last_cuda_error
/* And the kernels' C++ namespace: the emulated templates, inline helpers
 * (sm_count, launch_status, set_max_smem_once) and __global__ functions
 * would otherwise have the same mangled names as the real ones in a CUDA
 * build, and the linker would merge the two (an ODR violation: one binary
 * silently calling the other's code) or refuse the duplicate. */
#define pvlk pvlk_emu
#endif
