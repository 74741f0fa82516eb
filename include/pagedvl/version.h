/* libpagedvl version macros. The runtime value is pvl_version() in pagedvl.h;
 * compare it with PVL_VERSION to detect a header/library mismatch. */
#ifndef PAGEDVL_VERSION_H
#define PAGEDVL_VERSION_H

#define PVL_VERSION_MAJOR 0
#define PVL_VERSION_MINOR 1
#define PVL_VERSION_PATCH 0

/* major * 10000 + minor * 100 + patch, as NCCL_VERSION_CODE does. */
#define PVL_VERSION \
  (PVL_VERSION_MAJOR * 10000 + PVL_VERSION_MINOR * 100 + PVL_VERSION_PATCH)

#endif /* PAGEDVL_VERSION_H */
