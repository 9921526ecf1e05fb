/* SPDX-License-Identifier: GPL-2.0 */
/*
 * First object of the module: marks the start of the call-site section (.parainstructions, see pvops/src/site.rs). `ld -r` joins the
 * section's pieces in object order, so everything between this and sites_end.S is the
 * module's call-site records.
 */
	.pushsection .parainstructions, "a"
	.balign 4
	.globl pvops_sites_start
pvops_sites_start:
	.popsection
