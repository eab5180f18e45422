"""Small networks with hand-written backprop, each correct and with planted bugs.

Every example is written once against an array module `xp` and comes in two flavours:
`xp=jax.numpy` (traceable: jgc jits it and jax.grad breaks ties) and `xp=numpy` (the classic
course code: jgc falls back to a host loop). Each has a correct `grad` and named `bugs`, real
backprop mistakes, each with the exact set of leaves it makes wrong.

>>> from jgc.examples import mlp
>>> ex = mlp("tanh")
>>> sorted(ex.bugs)
['W1_transposed', 'act_derivative', 'b1_4_over_m', 'b2_sign', 'missing_1_over_m']
"""

from jgc.examples._nets import ALL as ALL
from jgc.examples._nets import Bug as Bug
from jgc.examples._nets import Example as Example
from jgc.examples._nets import batchnorm as batchnorm
from jgc.examples._nets import conv_maxpool as conv_maxpool
from jgc.examples._nets import dropout as dropout
from jgc.examples._nets import hidden_random_dropout as hidden_random_dropout
from jgc.examples._nets import mlp as mlp
from jgc.examples._nets import rnn as rnn
from jgc.examples._nets import softmax_l2 as softmax_l2
from jgc.examples._nets import wrong_custom_vjp as wrong_custom_vjp

__all__ = ("ALL", "Bug", "Example", "batchnorm", "conv_maxpool", "dropout",
           "hidden_random_dropout", "mlp", "rnn", "softmax_l2", "wrong_custom_vjp")
