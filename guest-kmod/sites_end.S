/* SPDX-License-Identifier: GPL-2.0 */
/* Last object of the module: marks the end of the call-site section (see sites_start.S). */
	.pushsection .parainstructions, "a"
	.balign 4
	.globl pvops_sites_end
pvops_sites_end:
	.popsection
