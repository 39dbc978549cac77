//! Symbolic dimensions: fixed sizes, interned symbols (`batch`, `seq`, `past`) and small
//! polynomial expressions of them (`past + seq`, `batch*seq`, `2*seq + 1`).
//!
//! A [`Dim`] is kept in a canonical form (a sorted list of monomials with non-zero
//! coefficients), so two dims are equal exactly when their expressions are equal as
//! polynomials, and printing is deterministic.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Mutex;

/// An interned symbol name. Cheap to copy and compare; ordered by name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sym(&'static str);

static INTERNER: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

impl Sym {
    /// Interns `name`. Symbol names are identifiers: `[A-Za-z_][A-Za-z0-9_]*`.
    pub fn new(name: &str) -> Sym {
        let mut guard = INTERNER.lock().unwrap_or_else(|e| e.into_inner());
        let set = guard.get_or_insert_with(HashSet::new);
        if let Some(s) = set.get(name) {
            return Sym(s);
        }
        let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
        set.insert(leaked);
        Sym(leaked)
    }

    pub fn name(self) -> &'static str {
        self.0
    }

    pub fn is_valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }
}

impl fmt::Debug for Sym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Display for Sym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for Sym {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Sym {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Sym::new(&s))
    }
}

/// A product of symbols (sorted, with repetition); empty = the constant monomial.
type Monomial = SmallVec<[Sym; 2]>;

/// A dimension: a polynomial over symbols with integer coefficients.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dim {
    /// Canonical: sorted by monomial (constant term last), no zero coefficients.
    terms: SmallVec<[(Monomial, i64); 1]>,
}

/// Values of the symbols at run time.
pub type Bindings = BTreeMap<Sym, usize>;

fn monomial_order(a: &Monomial, b: &Monomial) -> std::cmp::Ordering {
    // Higher degree first, then by names; the constant monomial sorts last.
    b.len().cmp(&a.len()).then_with(|| a.cmp(b))
}

impl Dim {
    pub fn fixed(n: usize) -> Dim {
        Dim::constant(n as i64)
    }

    fn constant(c: i64) -> Dim {
        let mut terms = SmallVec::new();
        if c != 0 {
            terms.push((Monomial::new(), c));
        }
        Dim { terms }
    }

    pub fn sym(name: &str) -> Dim {
        Dim::from(Sym::new(name))
    }

    fn from_terms(map: BTreeMap<Monomial, i64>) -> Dim {
        let mut terms: SmallVec<[(Monomial, i64); 1]> = map.into_iter().filter(|(_, c)| *c != 0).collect();
        terms.sort_by(|a, b| monomial_order(&a.0, &b.0));
        Dim { terms }
    }

    fn to_map(&self) -> BTreeMap<Monomial, i64> {
        self.terms.iter().cloned().collect()
    }

    /// The size, if it has no symbols. Negative constants are not sizes.
    pub fn as_fixed(&self) -> Option<usize> {
        match self.terms.as_slice() {
            [] => Some(0),
            [(m, c)] if m.is_empty() && *c >= 0 => Some(*c as usize),
            _ => None,
        }
    }

    pub fn is_fixed(&self) -> bool {
        self.as_fixed().is_some()
    }

    /// The polynomial's terms in canonical order: (product of symbols, coefficient); the
    /// constant term has no symbols. For renderers (codegen prints dims as C).
    pub fn terms(&self) -> impl Iterator<Item = (&[Sym], i64)> {
        self.terms.iter().map(|(m, c)| (m.as_slice(), *c))
    }

    /// The symbols this dim mentions, sorted.
    pub fn symbols(&self) -> Vec<Sym> {
        let mut v: Vec<Sym> = self.terms.iter().flat_map(|(m, _)| m.iter().copied()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Evaluates with the given symbol values. Errors name the unbound symbol or the
    /// negative result.
    pub fn eval(&self, b: &Bindings) -> Result<usize, String> {
        let mut acc: i64 = 0;
        for (m, c) in &self.terms {
            let mut p = *c;
            for s in m {
                let v = *b.get(s).ok_or_else(|| format!("symbol `{s}` has no value"))?;
                p = p.checked_mul(v as i64).ok_or("dimension overflows")?;
            }
            acc = acc.checked_add(p).ok_or("dimension overflows")?;
        }
        usize::try_from(acc).map_err(|_| format!("dimension `{self}` evaluates to {acc}"))
    }

    /// Substitutes known symbol values, leaving the others symbolic.
    pub fn substitute(&self, b: &Bindings) -> Dim {
        let mut map = BTreeMap::new();
        for (m, c) in &self.terms {
            let mut coeff = *c;
            let mut rest = Monomial::new();
            for s in m {
                match b.get(s) {
                    Some(v) => coeff *= *v as i64,
                    None => rest.push(*s),
                }
            }
            *map.entry(rest).or_insert(0) += coeff;
        }
        Dim::from_terms(map)
    }

    /// Exact division by a constant, when every coefficient is divisible.
    pub fn div_exact(&self, d: usize) -> Option<Dim> {
        if d == 0 {
            return None;
        }
        let d = d as i64;
        if self.terms.iter().all(|(_, c)| c % d == 0) {
            Some(Dim { terms: self.terms.iter().map(|(m, c)| (m.clone(), c / d)).collect() })
        } else {
            None
        }
    }
}

impl From<Sym> for Dim {
    fn from(s: Sym) -> Dim {
        let mut m = Monomial::new();
        m.push(s);
        let mut terms = SmallVec::new();
        terms.push((m, 1));
        Dim { terms }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::fixed(n)
    }
}

impl From<&Dim> for Dim {
    fn from(d: &Dim) -> Dim {
        d.clone()
    }
}

impl From<&str> for Dim {
    /// A symbol by name (`"seq"`).
    fn from(s: &str) -> Dim {
        Dim::sym(s)
    }
}

impl std::ops::Add for &Dim {
    type Output = Dim;
    fn add(self, o: &Dim) -> Dim {
        let mut map = self.to_map();
        for (m, c) in &o.terms {
            *map.entry(m.clone()).or_insert(0) += c;
        }
        Dim::from_terms(map)
    }
}

impl std::ops::Sub for &Dim {
    type Output = Dim;
    fn sub(self, o: &Dim) -> Dim {
        let mut map = self.to_map();
        for (m, c) in &o.terms {
            *map.entry(m.clone()).or_insert(0) -= c;
        }
        Dim::from_terms(map)
    }
}

impl std::ops::Mul for &Dim {
    type Output = Dim;
    fn mul(self, o: &Dim) -> Dim {
        let mut map: BTreeMap<Monomial, i64> = BTreeMap::new();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &o.terms {
                let mut m: Monomial = ma.iter().chain(mb.iter()).copied().collect();
                m.sort();
                *map.entry(m).or_insert(0) += ca * cb;
            }
        }
        Dim::from_terms(map)
    }
}

macro_rules! forward_owned {
    ($tr:ident, $f:ident) => {
        impl std::ops::$tr for Dim {
            type Output = Dim;
            fn $f(self, o: Dim) -> Dim {
                (&self).$f(&o)
            }
        }
        impl std::ops::$tr<usize> for Dim {
            type Output = Dim;
            fn $f(self, o: usize) -> Dim {
                (&self).$f(&Dim::fixed(o))
            }
        }
    };
}
forward_owned!(Add, add);
forward_owned!(Sub, sub);
forward_owned!(Mul, mul);

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        for (i, (m, c)) in self.terms.iter().enumerate() {
            let (sign, mag) = if *c < 0 { ("-", -c) } else { ("+", *c) };
            if i == 0 {
                if sign == "-" {
                    f.write_str("-")?;
                }
            } else {
                write!(f, " {sign} ")?;
            }
            if m.is_empty() {
                write!(f, "{mag}")?;
            } else {
                if mag != 1 {
                    write!(f, "{mag}*")?;
                }
                for (j, s) in m.iter().enumerate() {
                    if j > 0 {
                        f.write_str("*")?;
                    }
                    f.write_str(s.name())?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_compare_and_print() {
        let past = Dim::sym("past");
        let seq = Dim::sym("seq");
        let a = &past + &seq;
        let b = &seq + &past;
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "past + seq");
        let c = &(&a * &Dim::fixed(2)) - &Dim::fixed(1);
        assert_eq!(c.to_string(), "2*past + 2*seq - 1");
        assert_eq!((&a - &seq), past);
        let batch = Dim::sym("batch");
        assert_eq!((&batch * &seq).to_string(), "batch*seq");
        assert_eq!(Dim::fixed(6).as_fixed(), Some(6));
        let mut b = Bindings::new();
        b.insert(Sym::new("past"), 5);
        b.insert(Sym::new("seq"), 3);
        assert_eq!(c.eval(&b), Ok(15));
        assert!(batch.eval(&b).unwrap_err().contains("batch"));
        assert_eq!((&seq - &past).eval(&b).unwrap_err(), "dimension `-past + seq` evaluates to -2");
        assert_eq!(a.substitute(&b), Dim::fixed(8));
        assert_eq!(Dim::fixed(0).to_string(), "0");
    }
}
