"""The exact method's kernels built for the CPU with fused multiply-adds, as nvcc
builds them for the GPU (kernel_emulation.FMA_FLAGS).

The plain CPU build rounds every product; the GPU fuses a * b + c into one rounding.
An algorithm can depend on that: a fraction-free (Bareiss) form of the one-warp
solvers' Gauss-Jordan passed every CPU test and, on the GPU, lost the Newton direction
of the near-singular systems of tight components (cube EP64 components took 17-20
Newton iterations instead of 2; five GPU tests failed).  Built with these flags, the
CPU reproduced it: the two-copy test instances took 3374 Newton iterations instead of
700.  So here each exact solver, built both ways, must give the reference's answer and
take about as many Newton iterations with fused multiply-adds as without.
"""

import pytest

import kernel_emulation as emu
from instances import instances, rel_diff
from lplb_plugin.solvers.exact import solve_exact

pytestmark = [
    pytest.mark.skipif(emu.compiler() is None, reason="needs a C++ compiler"),
    pytest.mark.skipif(not emu.fma_supported(), reason="needs an x86-64 CPU with FMA"),
]


_FITS = {"pair": emu.fits_pair, "exact_warp": emu.fits_exact_warp, "exact": lambda graph: True}


@pytest.mark.parametrize("method", ["pair", "exact_warp", "exact"])
def test_fused_multiply_adds_same_answer_and_iterations(method):
    seen = 0
    newton = {False: 0, True: 0}
    for inst in instances(200, seed=17):
        if not _FITS[method](inst.graph):
            continue
        seen += 1
        ref = solve_exact(inst.graph, inst.loads)
        scale = float(inst.loads.max())
        for fma in (False, True):
            got = emu.solve_host(inst.graph, inst.loads, method, fma=fma)
            newton[fma] += int(got.iters[:, 1].sum())
            if ref.certified:  # (the reference can fall back where the kernels certify)
                assert bool(got.status.all()), (inst.name, fma)
                assert rel_diff(got.edge_flow, ref.edge_flow, scale) <= 1e-9, (inst.name, fma)
    assert seen >= 50, seen
    # rounding may move a step here and there, not the iteration count as a whole
    assert newton[True] <= 1.05 * newton[False] + 5, newton
    print(f"{method}: {seen} instances, Newton iterations {newton[False]} plain, {newton[True]} with FMA")
