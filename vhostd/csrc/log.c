/* The dirty log, for the Python reference path (C paths inline log.h). */
#include "log.h"

void vhostd_log_mark(struct vhostd_log *l, uint64_t gpa, uint64_t len)
{
    vhostd_log_write(l, gpa, len);
}
