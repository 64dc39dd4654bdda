"""Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 are constexpr functions
whose host calls cost a few microseconds each (argument unwrapping); a launch computes a dozen of them."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def signed(x, source, sign: float):
    """x times sign (1, -1 or 0: softmax_scale's sign, folded into the rotated q): in place when x is a launcher's
    scratch buffer, a copy when it is the caller's tensor (source)."""
    if sign == 1.0:
        return x
    return x * sign if x is source else x.mul_(sign)
