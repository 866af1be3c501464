from healer.doctor import Check

CHECKS: list[Check] = []
