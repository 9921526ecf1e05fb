/* SPDX-License-Identifier: GPL-2.0 */
/* The C functions pvops_kmod.rs calls (its `mod shim` mirrors this list). */
#ifndef PVOPS_SHIM_H
#define PVOPS_SHIM_H

const char *pvops_shim_backend_param(void);
unsigned long pvops_shim_tsc_khz(void);
void *pvops_shim_alias_text(unsigned long start, unsigned long end);
void pvops_shim_unalias_text(void *alias);
int pvops_shim_stop_machine(int (*fn)(void *), void *data);
void pvops_shim_sync_core(void);
void pvops_shim_set_report(const char *backend, const char *hypervisor, const char *sites,
			   const char *selftest);
int pvops_shim_sysfs_create(void);
void pvops_shim_sysfs_remove(void);

#endif
