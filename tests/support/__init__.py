"""What the tests share, imported by them and never the other way round: the model zoo and
output readers (``models``), the numpy references (``reference``, ``quant_ref``), a local
Hub server (``hub_server``), and the case tables and model families more than one test
module uses (``memory``, ``task_cases``, ``method_cases``, ``quant_models``, ``sums``).
A test module imports from here, never from another test module (``test_architecture``).
"""
