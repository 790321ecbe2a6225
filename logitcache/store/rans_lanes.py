"""The rANS decode step on 16 lanes at once: a numba intrinsic written in LLVM IR (imports numba; see below).

:func:`step16` decodes one symbol on each of up to 16 consecutive lanes (docs/format.md, "rANS"):
masked vector loads of the lane states and contexts, a gather of each context's row (and the checks
on it), of each lane's symbol from the slot table and of its frequency and start
(:class:`rans.Lookup`), the state update in 32-bit lanes, and the refill as an *expand load*: the
lanes whose state fell below ``2**16`` take the next words in lane order, which is the order the
format stores them in. numba's loop vectoriser does not emit these itself (it cannot prove a loop's
stores miss the table it gathers from), so they are spelled out here with LLVM's generic
``llvm.masked.*`` intrinsics, which LLVM lowers to ``vpgather``/``vpexpandw`` on AVX-512 and to
plain loads elsewhere (same results on every target).

This module imports numba and llvmlite, so it is imported only by :mod:`logitcache.store.jit` when
the kernels compile (:func:`jit.bind_on_first_use`), never with the store. numba's on-disk cache keys
a kernel on its own file only: after editing this one, touch ``rans.py`` and ``entropy.py`` (their
kernels inline this step) or their cached machine code stays the old one.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

WIDTH = 16
PRECISION = 12  # rans.PRECISION
LOW_BITS = 16  # rans.LOW == 2 ** LOW_BITS
_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)


def _vec(t: ir.Type) -> ir.VectorType:
    return ir.VectorType(t, WIDTH)


def _const(t: ir.IntType, value: int) -> ir.Constant:
    return ir.Constant(_vec(t), [value] * WIDTH)


def _splat(builder, value) -> ir.Value:
    v = builder.insert_element(ir.Constant(_vec(value.type), None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vec(_I32), [0] * WIDTH))


def _call(builder, name: str, ret: ir.Type, args: list) -> ir.Value:
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _data(context, builder, array_type, array) -> ir.Value:
    return cgutils.create_struct_proxy(array_type)(context, builder, value=array).data


def _vptr(builder, ptr, t: ir.IntType) -> ir.Value:
    return builder.bitcast(ptr, _vec(t).as_pointer())


def _load(builder, ptr, t: ir.IntType, mask) -> ir.Value:
    return _call(builder, f"llvm.masked.load.v{WIDTH}i{t.width}.p0", _vec(t),
                 [_vptr(builder, ptr, t), ir.Constant(_I32, 1), mask, ir.Constant(_vec(t), None)])


def _store(builder, value, ptr, mask) -> None:
    t = value.type.element
    _call(builder, f"llvm.masked.store.v{WIDTH}i{t.width}.p0", ir.VoidType(),
          [value, _vptr(builder, ptr, t), ir.Constant(_I32, 1), mask])


def _gather(builder, base, index, itemsize: int, mask) -> ir.Value:
    """The 32 bits at ``base + itemsize * index`` per lane (``index`` u32 lanes) where ``mask``, else 0
    (for 1- or 2-byte items the caller masks the bits above the item off)."""
    addr = builder.add(_splat(builder, builder.ptrtoint(base, _I64)),
                       builder.mul(builder.zext(index, _vec(_I64)), _const(_I64, itemsize)))
    return _call(builder, f"llvm.masked.gather.v{WIDTH}i32.v{WIDTH}p0", _vec(_I32),
                 [builder.inttoptr(addr, ir.VectorType(_I32.as_pointer(), WIDTH)), ir.Constant(_I32, 1), mask,
                  ir.Constant(_vec(_I32), None)])


@intrinsic
def step16(typingctx, x, lane, contexts, c0, rows, slots, fc, words, pos, out, o0, n):
    """``step16(x, lane, contexts, c0, rows, slots, fc, words, pos, out, o0, n) -> pos``: lanes ``lane + j``
    for ``j < n <= 16`` decode one symbol each under context ``contexts[c0 + j]`` (its row ``rows[...]``)
    into ``out[o0 + j]``, refilling from ``words[pos:]``; returns ``pos`` past the words read, or
    ``-2`` (a context with an empty row) or ``-3`` (a context outside ``rows``) having changed nothing
    that matters (the caller stops). ``words`` must hold 16 words past ``pos`` and ``slots`` 4 bytes
    past its last slot (:class:`rans.Lookup`)."""
    sig = types.int64(x, lane, contexts, c0, rows, slots, fc, words, pos, out, o0, n)

    def codegen(context, builder, sig, args):
        x_, lane_, contexts_, c0_, rows_, slots_, fc_, words_, pos_, out_, o0_, n_ = args
        data = [_data(context, builder, t, v) if isinstance(t, types.Array) else None for t, v in zip(sig.args, args)]
        shape = lambda i, d: builder.extract_value(  # noqa: E731
            cgutils.create_struct_proxy(sig.args[i])(context, builder, value=args[i]).shape, d)
        active = builder.icmp_unsigned("<", ir.Constant(_vec(_I32), list(range(WIDTH))),
                                       _splat(builder, builder.trunc(n_, _I32)))
        ctx_type = context.get_value_type(sig.args[2].dtype)
        ctx = _load(builder, builder.gep(data[2], [c0_]), ctx_type, active)
        extend = builder.sext if sig.args[2].dtype.signed else builder.zext  # a negative context stays outside
        ctx_wide = extend(ctx, _vec(_I64)) if ctx_type.width < 64 else ctx
        inside = builder.and_(active, builder.icmp_unsigned("<", ctx_wide, _splat(builder, shape(4, 0))))
        row = _gather(builder, data[4], builder.trunc(ctx_wide, _vec(_I32)), 4, inside)
        used = builder.and_(inside, builder.icmp_signed(">=", row, _const(_I32, 0)))
        x_at = builder.gep(data[0], [lane_])
        xs = _load(builder, x_at, _I32, active)
        slot = builder.and_(xs, _const(_I32, (1 << PRECISION) - 1))
        symbol_bits = context.get_value_type(sig.args[5].dtype).width  # uint8 or uint16 slots
        symbol = builder.and_(_gather(builder, data[5], builder.or_(builder.shl(row, _const(_I32, PRECISION)), slot),
                                      symbol_bits // 8, used), _const(_I32, (1 << symbol_bits) - 1))
        alphabet = _splat(builder, builder.trunc(shape(6, 1), _I32))
        entry = _gather(builder, data[6], builder.add(builder.mul(row, alphabet), symbol), 4, used)  # freq << P | cum
        xs = builder.add(builder.mul(builder.lshr(entry, _const(_I32, PRECISION)),  # f * (x >> P) + slot - cum
                                     builder.lshr(xs, _const(_I32, PRECISION))),
                         builder.sub(slot, builder.and_(entry, _const(_I32, (1 << PRECISION) - 1))))
        refill = builder.and_(used, builder.icmp_unsigned("<", xs, _const(_I32, 1 << LOW_BITS)))
        word = _call(builder, f"llvm.masked.expandload.v{WIDTH}i16", _vec(_I16),
                     [builder.gep(data[7], [pos_]), refill, ir.Constant(_vec(_I16), None)])
        refilled = builder.or_(builder.shl(xs, _const(_I32, LOW_BITS)), builder.zext(word, _vec(_I32)))
        xs = builder.select(refill, refilled, xs)
        _store(builder, xs, x_at, used)
        symbol_type = context.get_value_type(sig.args[9].dtype)
        _store(builder, builder.trunc(symbol, _vec(symbol_type)) if symbol_type.width < 32 else symbol,
               builder.gep(data[9], [o0_]), used)
        refills = _call(builder, "llvm.ctpop.i16", _I16, [builder.bitcast(refill, _I16)])
        new_pos = builder.add(pos_, builder.zext(refills, _I64))
        all_of = lambda mask: builder.icmp_unsigned("==", builder.bitcast(mask, _I16),  # noqa: E731
                                                    builder.bitcast(active, _I16))
        return builder.select(all_of(inside), builder.select(all_of(used), new_pos, ir.Constant(_I64, -2)),
                              ir.Constant(_I64, -3))

    return sig, codegen
